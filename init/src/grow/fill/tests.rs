//! The fill's decisions and its write/record order, on plain files.

use super::*;

const MIB: u64 = 1 << 20;

fn state(from: u64, filled_to: u64, end: u64, done: bool) -> State {
    State { from, filled_to, end, done }
}

#[test]
fn plan_does_only_what_is_left() {
    let (x, m) = (100 * MIB, 400 * MIB);
    let fill = |from, resume| Work::Fill { from, resume, end: m };
    let cases: &[(&str, u64, Option<State>, Work)] = &[
        ("xfs spans the mapping", m, None, Work::Nothing),
        ("xfs spans it, a stale record", m, Some(state(x, 200 * MIB, m, false)), Work::Nothing),
        ("first boot after growing", x, None, fill(x, x)),
        ("resumed", x, Some(state(x, 250 * MIB, m, false)), fill(x, 250 * MIB)),
        ("a record still at its start", x, Some(state(x, x, m, false)), fill(x, x)),
        ("filled, xfs not grown yet", x, Some(state(x, m, m, false)), Work::Grow { from: x, end: m }),
        ("grown as far as xfs goes", m - 64 * 1024, Some(state(x, m, m, true)), Work::Nothing),
        (
            "done, then the disk grew again",
            300 * MIB,
            Some(state(x, 300 * MIB, 300 * MIB, true)),
            fill(300 * MIB, 300 * MIB),
        ),
        ("a record from a bigger disk", x, Some(state(x, 500 * MIB, 500 * MIB, false)), fill(x, x)),
        ("a record that starts past xfs's end", x, Some(state(x + MIB, 200 * MIB, m, false)), fill(x, x)),
        (
            "a record behind xfs (grown by hand)",
            150 * MIB,
            Some(state(x, 120 * MIB, m, false)),
            fill(x, 150 * MIB),
        ),
        ("a record that makes no sense", x, Some(state(x, x - MIB, m, false)), fill(x, x)),
    ];
    for (what, xfs_end, st, expect) in cases {
        assert_eq!(plan(*xfs_end, m, st.as_ref()), *expect, "{what}");
    }
    assert_eq!(fill(x, 250 * MIB).to_fill(), Some(150 * MIB));
    assert_eq!(Work::Grow { from: x, end: m }.to_fill(), Some(0));
    assert_eq!(Work::Nothing.to_fill(), None);
}

/// A 64 MiB "mapping" whose first 16 MiB are the file system and the rest old stick contents.
fn disk(dir: &Path) -> (PathBuf, File) {
    let path = dir.join("mapping");
    let bytes: Vec<u8> = (0..64 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&path, bytes).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    (path, f)
}

fn zero_through(path: &Path, range: std::ops::Range<u64>) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes[range.start as usize..range.end as usize].iter().all(|b| *b == 0)
}

#[test]
fn a_stopped_fill_resumes_where_its_record_says_and_never_records_ahead_of_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = disk(dir.path());
    let record = dir.path().join(STATE_FILE);
    let (x, m) = (16 * MIB, 64 * MIB);
    let before = std::fs::read(&path).unwrap();

    // Stop after 9 chunks of 1 MiB, with a record every 4 MiB: the stop records 9 MiB.
    let mut chunks = 0;
    let mut seen = Vec::new();
    let mut stop = || {
        chunks += 1;
        // Whatever the record says now must already be zeros on the "device".
        if let Some(s) = load(&record) {
            assert!(zero_through(&path, s.from..s.filled_to), "record {s:?} ahead of the data");
        }
        chunks == 9
    };
    let got = fill(&dev, &record, (x, x, m), (MIB as usize, 4 * MIB), &mut stop, &mut |at| seen.push(at));
    assert_eq!(got.unwrap(), Filled::Stopped(x + 9 * MIB));
    assert_eq!(seen, [x + 4 * MIB, x + 8 * MIB, x + 9 * MIB]);
    assert_eq!(load(&record), Some(state(x, x + 9 * MIB, m, false)));

    // The next boot: resume from the record, to the end.
    let work = plan(x, m, load(&record).as_ref());
    assert_eq!(work, Work::Fill { from: x, resume: x + 9 * MIB, end: m });
    let Work::Fill { from, resume, end } = work else { unreachable!() };
    let mut calls = 0;
    let got = fill(
        &dev,
        &record,
        (from, resume, end),
        (MIB as usize, 16 * MIB),
        &mut || {
            calls += 1;
            false
        },
        &mut |_| {},
    );
    assert_eq!(got.unwrap(), Filled::All);
    assert_eq!(calls, 39, "one question per chunk");
    assert_eq!(load(&record), Some(state(x, m, m, false)));
    assert_eq!(plan(x, m, load(&record).as_ref()), Work::Grow { from: x, end: m });

    let after = std::fs::read(&path).unwrap();
    assert_eq!(after[..x as usize], before[..x as usize], "the file system's part was touched");
    assert!(after[x as usize..].iter().all(|b| *b == 0), "old contents left in the filled area");
}

#[test]
fn unaligned_ranges_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = disk(dir.path());
    let record = dir.path().join(STATE_FILE);
    let before = std::fs::read(&path).unwrap();
    let err = fill(&dev, &record, (0, 512, MIB), (MIB as usize, MIB), &mut || false, &mut |_| {});
    assert!(matches!(err, Err(FillError::Unaligned { what: "start", value: 512 })), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(load(&record).is_none());
}

#[test]
fn a_damaged_record_means_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join(STATE_FILE);
    std::fs::write(&record, "{\"from\": 1, \"filled_to\"").unwrap();
    assert_eq!(load(&record), None);
    std::fs::write(&record, "{\"from\":1,\"filled_to\":2,\"end\":3,\"done\":false,\"extra\":1}").unwrap();
    assert_eq!(load(&record), None, "unknown fields are not this record");
}

#[test]
fn status_shows_the_record() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(STATE_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(status(root.path()), json!(null));
    save(&dir.join(STATE_FILE), &state(100, 175, 400, false)).unwrap();
    let s = status(root.path());
    assert_eq!(s["state"], "filling");
    assert_eq!(s["percent"], 25.0);
    assert_eq!(s["filled_to"], 175);
    save(&dir.join(STATE_FILE), &state(100, 400, 400, true)).unwrap();
    assert_eq!(status(root.path())["state"], "done");
}

#[test]
fn tenths_of_the_whole_fill() {
    assert_eq!(tenths(100, 100, 200), 0);
    assert_eq!(tenths(100, 119, 200), 1);
    assert_eq!(tenths(100, 200, 200), 10);
    assert_eq!(tenths(0, 0, 0), 0);
}

/// The test runner is no child of PID 1 on an appliance: the fill refuses before it opens
/// anything.
#[test]
fn refuses_on_a_host() {
    assert!(matches!(child(), Err(FillError::Guard(_))), "the fill ran on a host");
}
