//! What the appliance's processes take of its memory, for the control socket's `status`: each
//! process's resident set and proportional set (PSS: shared pages divided among the processes
//! sharing them, so that PSS sums to what the processes really take) from
//! `/proc/<pid>/smaps_rollup`, summed per service (the launch chain and everything below it),
//! per program, and over the whole machine. Kernel threads have no memory of their own and
//! are left out.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

/// One process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    /// The kernel's short name of its program (`comm`).
    pub program: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// Every user-space process under `proc` (normally `/proc`).
pub fn processes(proc: &Path) -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir(proc) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| read_process(&proc.join(pid.to_string()), pid))
        .collect()
}

fn read_process(dir: &Path, pid: i32) -> Option<Process> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses: the last `)` ends it.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let program = stat.get(open + 1..close)?.to_string();
    let ppid = stat.get(close + 2..)?.split_whitespace().nth(1)?.parse().ok()?;
    let rollup = std::fs::read_to_string(dir.join("smaps_rollup")).ok()?;
    let field = |name: &str| {
        rollup.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
    };
    // Kernel threads have an empty rollup.
    let rss_kib = field("Rss:")?;
    Some(Process { pid, ppid, program, rss_kib, pss_kib: field("Pss:").unwrap_or(rss_kib) })
}

/// Sums of a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum {
    pub processes: usize,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl Sum {
    fn add(&mut self, p: &Process) {
        self.processes += 1;
        self.rss_kib += p.rss_kib;
        self.pss_kib += p.pss_kib;
    }

    pub fn to_json(self) -> Value {
        json!({ "processes": self.processes, "rss_kib": self.rss_kib, "pss_kib": self.pss_kib })
    }
}

/// `root` and every process below it.
pub fn tree(procs: &[Process], root: i32) -> Sum {
    let mut sum = Sum::default();
    let mut frontier = vec![root];
    while let Some(pid) = frontier.pop() {
        if let Some(p) = procs.iter().find(|p| p.pid == pid) {
            sum.add(p);
        }
        // The parent links of a process table form a tree: each pid is reached once.
        frontier.extend(procs.iter().filter(|p| p.ppid == pid && p.pid != pid).map(|p| p.pid));
    }
    sum
}

/// Per program name, and the total.
pub fn by_program(procs: &[Process]) -> (BTreeMap<String, Sum>, Sum) {
    let mut per = BTreeMap::<String, Sum>::new();
    let mut total = Sum::default();
    for p in procs {
        per.entry(p.program.clone()).or_default().add(p);
        total.add(p);
    }
    (per, total)
}

/// The process `pid` alone.
pub fn process(procs: &[Process], pid: i32) -> Sum {
    let mut sum = Sum::default();
    procs.iter().filter(|p| p.pid == pid).for_each(|p| sum.add(p));
    sum
}

/// The `memory` object of `status`: the machine's totals, each program's, and PID 1's own
/// (its program's figure, `init`, also holds every launch chain and ns-init, which run the
/// same binary).
pub fn status(procs: &[Process]) -> Value {
    let (per, total) = by_program(procs);
    let programs: serde_json::Map<String, Value> = per.into_iter().map(|(k, v)| (k, v.to_json())).collect();
    json!({ "total": total.to_json(), "programs": programs, "pid1": process(procs, 1).to_json() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, pid: i32, ppid: i32, comm: &str, rss: Option<(u64, u64)>) {
        let p = dir.join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("stat"), format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560\n"))
            .unwrap();
        let rollup = match rss {
            Some((rss, pss)) => {
                format!("55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: {rss} kB\nPss: {pss} kB\n")
            }
            None => String::new(),
        };
        std::fs::write(p.join("smaps_rollup"), rollup).unwrap();
    }

    #[test]
    fn services_sum_their_trees_and_programs_their_processes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake(d, 1, 0, "init", Some((6000, 4000)));
        fake(d, 2, 0, "kthreadd", None);
        fake(d, 10, 1, "init", Some((3000, 1000)));
        fake(d, 11, 10, "init", Some((3000, 1000)));
        fake(d, 12, 11, "tor", Some((40000, 38000)));
        fake(d, 20, 1, "init", Some((3000, 1000)));
        fake(d, 21, 20, "sshd: bob (priv)", Some((8000, 2000)));
        std::fs::create_dir_all(d.join("self")).unwrap();
        let procs = processes(d);
        assert_eq!(procs.len(), 6, "the kernel thread and non-pid entries are left out");
        assert_eq!(tree(&procs, 10), Sum { processes: 3, rss_kib: 46_000, pss_kib: 40_000 });
        assert_eq!(tree(&procs, 99), Sum::default());
        let (per, total) = by_program(&procs);
        assert_eq!(per["init"].processes, 4);
        assert_eq!(per["sshd: bob (priv)"].rss_kib, 8000);
        assert_eq!(total, Sum { processes: 6, rss_kib: 63_000, pss_kib: 47_000 });
        assert_eq!(status(&procs)["programs"]["tor"]["pss_kib"], 38_000);
        // PID 1 on its own, apart from the launch chains that share its program name.
        assert_eq!(process(&procs, 1), Sum { processes: 1, rss_kib: 6000, pss_kib: 4000 });
        assert_eq!(status(&procs)["pid1"], json!({"processes": 1, "rss_kib": 6000, "pss_kib": 4000}));
        assert_eq!(process(&procs, 2), Sum::default(), "a kernel thread has no memory figure");
    }

    /// The real /proc of the machine running the test: this process is in it, with memory.
    #[test]
    fn reads_this_process_from_the_real_proc() {
        let me = i32::try_from(std::process::id()).unwrap();
        let procs = processes(Path::new("/proc"));
        let p = procs.iter().find(|p| p.pid == me).expect("the test's own process");
        assert!(p.rss_kib > 0 && p.pss_kib <= p.rss_kib, "{p:?}");
    }
}
