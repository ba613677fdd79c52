//! What a VM is made of ([`VmConfig`]) and the QEMU command line built from it. Building the command
//! line is pure, so every flag that matters for isolation (`-nic none`, `bootindex=0`, read-only
//! firmware) is unit-tested without starting QEMU.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{Accel, Accelerator, Firmware};

/// The QEMU binary, looked up in `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";

/// File names inside a VM's work dir.
pub(crate) const VARS_FILE: &str = "OVMF_VARS.fd";
pub(crate) const QMP_SOCKET: &str = "qmp.sock";
pub(crate) const CONSOLE_LOG: &str = "console.log";
pub(crate) const QEMU_LOG: &str = "qemu.log";

/// The VM's network.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No NIC at all (`-nic none`): the guest sees no network device.
    #[default]
    None,
    /// One virtio NIC on an existing tap device inside an existing network namespace; QEMU itself is
    /// run inside that namespace (`ip netns exec`), so the tap never has to exist in the host's.
    Tap {
        /// Network namespace holding the tap (as known to `ip netns`).
        netns: String,
        /// Tap interface name inside `netns`.
        tap: String,
        /// Guest MAC address; QEMU picks one when absent.
        mac: Option<String>,
    },
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Console {
    /// The terminal QEMU inherits, multiplexed with the monitor (`-serial mon:stdio`): for people.
    Stdio,
    /// Pipes read and written by [`crate::Vm`]: for tests.
    #[default]
    Captured,
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Raw disk image, attached as the first boot device.
    pub image: PathBuf,
    /// OVMF build.
    pub firmware: Firmware,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Requested accelerator; `Auto` is resolved when the VM starts.
    pub accel: Accel,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Network device, if any.
    pub network: Network,
    /// Serial console wiring.
    pub console: Console,
    /// Per-VM directory: variable store copy, sockets and logs live here.
    pub work_dir: PathBuf,
    /// More raw disks, attached after the image, not bootable.
    pub extra_drives: Vec<PathBuf>,
    /// Writes to `image` go to a throw-away overlay (`snapshot=on`), so the image stays as built.
    pub snapshot: bool,
    /// Every write to `image` is also logged here (QEMU's `blklogwrites`, dm-log-writes'
    /// format), so a test can replay any prefix of them: every power-cut point of one boot.
    pub write_log: Option<PathBuf>,
}

impl VmConfig {
    /// The same config with every path absolute. QEMU runs with `work_dir` as its working
    /// directory (short socket paths), so a relative image path given by a user would otherwise
    /// name a file inside the work directory.
    pub fn absolute(mut self) -> crate::Result<VmConfig> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|source| crate::Error::WorkDir { path: p.to_owned(), source })
        };
        self.image = abs(&self.image)?;
        self.work_dir = abs(&self.work_dir)?;
        self.firmware.code = abs(&self.firmware.code)?;
        self.firmware.vars_template = abs(&self.firmware.vars_template)?;
        self.extra_drives = self.extra_drives.iter().map(|d| abs(d)).collect::<crate::Result<_>>()?;
        self.write_log = self.write_log.as_deref().map(abs).transpose()?;
        Ok(self)
    }

    /// A config with defaults: 1 GiB, 2 CPUs, accelerator auto, no network, captured console, image
    /// written in place.
    pub fn new(image: impl Into<PathBuf>, firmware: Firmware, work_dir: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            image: image.into(),
            firmware,
            memory_mib: 1024,
            accel: Accel::Auto,
            cpus: 2,
            network: Network::None,
            console: Console::Captured,
            work_dir: work_dir.into(),
            extra_drives: Vec::new(),
            snapshot: false,
            write_log: None,
        }
    }

    /// The VM's private copy of the OVMF variable store.
    pub fn vars_path(&self) -> PathBuf {
        self.work_dir.join(VARS_FILE)
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.work_dir.join(QMP_SOCKET)
    }

    /// The raw serial log written by [`crate::Vm`].
    pub fn console_log_path(&self) -> PathBuf {
        self.work_dir.join(CONSOLE_LOG)
    }

    /// QEMU's own stderr, for a [`Console::Captured`] VM.
    pub fn qemu_log_path(&self) -> PathBuf {
        self.work_dir.join(QEMU_LOG)
    }

    /// The full command, program first. It runs with `work_dir` as current directory: the QMP socket
    /// is named relative to it because a unix socket path is limited to 107 bytes.
    pub fn command_line(&self, accel: Accelerator) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Network::Tap { netns, .. } = &self.network {
            argv.extend(["ip", "netns", "exec", netns.as_str()].map(OsString::from));
        }
        argv.push(QEMU.into());
        let cpu = match accel {
            Accelerator::Kvm => "host",
            Accelerator::Tcg => "max",
        };
        push_all(&mut argv, ["-machine", &format!("q35,accel={}", accel.qemu_name()), "-cpu", cpu]);
        push_all(&mut argv, ["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()]);
        push_all(&mut argv, ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        self.push_firmware(&mut argv);
        self.push_disks(&mut argv);
        self.push_network(&mut argv);
        let serial = match self.console {
            Console::Stdio => "mon:stdio",
            Console::Captured => "stdio",
        };
        push_all(&mut argv, ["-serial", serial]);
        push_all(&mut argv, ["-qmp", &format!("unix:{QMP_SOCKET},server=on,wait=off")]);
        argv
    }

    fn push_firmware(&self, argv: &mut Vec<OsString>) {
        let code = opt_path(&self.firmware.code);
        let vars = opt_path(&self.vars_path());
        argv.push("-drive".into());
        argv.push(format!("if=pflash,unit=0,format=raw,readonly=on,file={code}").into());
        argv.push("-drive".into());
        argv.push(format!("if=pflash,unit=1,format=raw,file={vars}").into());
    }

    fn push_disks(&self, argv: &mut Vec<OsString>) {
        let snapshot = if self.snapshot { ",snapshot=on" } else { "" };
        let image = opt_path(&self.image);
        let disk0 = match &self.write_log {
            Some(log) => format!(
                "if=none,id=disk0,driver=blklogwrites,file.driver=file,file.filename={image},\
                 log.driver=file,log.filename={}{snapshot}",
                opt_path(log)
            ),
            None => format!("file={image},if=none,id=disk0,format=raw{snapshot}"),
        };
        push_all(argv, ["-drive", &disk0]);
        push_all(argv, ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"]);
        for (i, drive) in self.extra_drives.iter().enumerate() {
            let id = format!("disk{}", i + 1);
            push_all(argv, ["-drive", &format!("file={},if=none,id={id},format=raw", opt_path(drive))]);
            push_all(argv, ["-device", &format!("virtio-blk-pci,drive={id}")]);
        }
    }

    fn push_network(&self, argv: &mut Vec<OsString>) {
        match &self.network {
            Network::None => push_all(argv, ["-nic", "none"]),
            Network::Tap { tap, mac, .. } => {
                let netdev = format!("tap,id=n0,ifname={},script=no,downscript=no", escape_opt(tap));
                let mac = mac.as_ref().map(|m| format!(",mac={}", escape_opt(m))).unwrap_or_default();
                push_all(argv, ["-netdev", &netdev]);
                push_all(argv, ["-device", &format!("virtio-net-pci,netdev=n0{mac}")]);
            }
        }
    }
}

fn push_all<const N: usize>(argv: &mut Vec<OsString>, args: [&str; N]) {
    argv.extend(args.map(OsString::from));
}

/// A path inside a QEMU `key=value,...` option, where a literal comma is written twice.
fn opt_path(path: &Path) -> String {
    escape_opt(&path.to_string_lossy())
}

fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let fw = Firmware { code: "/fw/CODE.fd".into(), vars_template: "/fw/VARS.fd".into() };
        VmConfig::new("/img/disk.raw", fw, "/work/vm1")
    }

    fn args(cfg: &VmConfig, accel: Accelerator) -> Vec<String> {
        cfg.command_line(accel).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn has_pair(argv: &[String], flag: &str, value: &str) -> bool {
        argv.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    /// QEMU's user-mode network can come from `-netdev user`, `-nic user` or legacy `-net user`.
    fn has_user_networking(argv: &[String]) -> bool {
        argv.windows(2).any(|w| w[0].starts_with("-n") && w[1].starts_with("user"))
    }

    #[test]
    fn relative_paths_become_absolute_from_the_callers_directory() {
        let fw = Firmware { code: "fw/CODE.fd".into(), vars_template: "fw/VARS.fd".into() };
        let mut cfg = VmConfig::new("target/disk.img", fw, "run/vm");
        cfg.extra_drives = vec!["second.img".into()];
        let cfg = cfg.absolute().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(cfg.image, cwd.join("target/disk.img"));
        assert_eq!(cfg.work_dir, cwd.join("run/vm"));
        assert_eq!(cfg.firmware.code, cwd.join("fw/CODE.fd"));
        assert_eq!(cfg.extra_drives, [cwd.join("second.img")]);
        let argv = args(&cfg, Accelerator::Tcg);
        assert!(
            argv.iter().any(|a| a.contains(&format!("file={}", cwd.join("target/disk.img").display()))),
            "{argv:?}"
        );
    }

    #[test]
    fn no_network_means_no_nic_and_never_user_networking() {
        let argv = args(&config(), Accelerator::Tcg);
        assert_eq!(argv[0], QEMU);
        assert!(has_pair(&argv, "-nic", "none"), "{argv:?}");
        assert!(!has_user_networking(&argv) && !argv.contains(&"-netdev".to_string()), "{argv:?}");
        // Without -nodefaults QEMU adds a NIC on user networking by itself.
        assert!(argv.contains(&"-nodefaults".to_string()));
        assert!(has_user_networking(&["-nic".into(), "user,model=e1000".into()]), "checker must work");
    }

    #[test]
    fn tap_runs_qemu_inside_the_namespace() {
        let mut cfg = config();
        cfg.network =
            Network::Tap { netns: "ns1".into(), tap: "tap0".into(), mac: Some("52:54:00:12:34:56".into()) };
        let argv = args(&cfg, Accelerator::Tcg);
        assert_eq!(argv[..5], ["ip", "netns", "exec", "ns1", QEMU]);
        assert!(has_pair(&argv, "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"), "{argv:?}");
        assert!(has_pair(&argv, "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"));
        assert!(!argv.contains(&"-nic".to_string()));
        assert!(!has_user_networking(&argv));
    }

    #[test]
    fn disk_boots_first_and_extra_drives_do_not() {
        let mut cfg = config();
        cfg.extra_drives = vec!["/img/data.raw".into()];
        let argv = args(&cfg, Accelerator::Tcg);
        assert!(has_pair(&argv, "-drive", "file=/img/disk.raw,if=none,id=disk0,format=raw"), "{argv:?}");
        assert!(has_pair(&argv, "-device", "virtio-blk-pci,drive=disk0,bootindex=0"));
        assert!(has_pair(&argv, "-drive", "file=/img/data.raw,if=none,id=disk1,format=raw"));
        assert!(has_pair(&argv, "-device", "virtio-blk-pci,drive=disk1"));
        assert_eq!(argv.iter().filter(|a| a.contains("bootindex")).count(), 1);
    }

    #[test]
    fn snapshot_protects_only_the_image() {
        let mut cfg = config();
        cfg.snapshot = true;
        cfg.extra_drives = vec!["/img/data.raw".into()];
        let argv = args(&cfg, Accelerator::Tcg);
        assert!(has_pair(&argv, "-drive", "file=/img/disk.raw,if=none,id=disk0,format=raw,snapshot=on"));
        assert_eq!(argv.iter().filter(|a| a.contains("snapshot")).count(), 1);
    }

    #[test]
    fn a_write_log_wraps_only_the_image() {
        let mut cfg = config();
        cfg.write_log = Some("/img/writes.log".into());
        cfg.extra_drives = vec!["/img/data.raw".into()];
        let argv = args(&cfg, Accelerator::Tcg);
        let disk0 = "if=none,id=disk0,driver=blklogwrites,file.driver=file,file.filename=/img/disk.raw,\
                     log.driver=file,log.filename=/img/writes.log";
        assert!(has_pair(&argv, "-drive", disk0), "{argv:?}");
        assert!(has_pair(&argv, "-drive", "file=/img/data.raw,if=none,id=disk1,format=raw"));
        assert!(has_pair(&argv, "-device", "virtio-blk-pci,drive=disk0,bootindex=0"));
    }

    #[test]
    fn firmware_code_is_read_only_and_vars_is_the_private_copy() {
        let argv = args(&config(), Accelerator::Tcg);
        assert!(has_pair(&argv, "-drive", "if=pflash,unit=0,format=raw,readonly=on,file=/fw/CODE.fd"));
        assert!(has_pair(&argv, "-drive", "if=pflash,unit=1,format=raw,file=/work/vm1/OVMF_VARS.fd"));
        assert!(argv.iter().all(|a| !a.contains("/fw/VARS.fd")), "template must never be attached");
    }

    #[test]
    fn accelerator_picks_machine_and_cpu() {
        let tcg = args(&config(), Accelerator::Tcg);
        assert!(has_pair(&tcg, "-machine", "q35,accel=tcg") && has_pair(&tcg, "-cpu", "max"));
        let kvm = args(&config(), Accelerator::Kvm);
        assert!(has_pair(&kvm, "-machine", "q35,accel=kvm") && has_pair(&kvm, "-cpu", "host"));
    }

    #[test]
    fn console_wiring() {
        let mut cfg = config();
        let argv = args(&cfg, Accelerator::Tcg);
        assert!(has_pair(&argv, "-serial", "stdio"));
        assert!(has_pair(&argv, "-qmp", "unix:qmp.sock,server=on,wait=off"));
        cfg.console = Console::Stdio;
        assert!(has_pair(&args(&cfg, Accelerator::Tcg), "-serial", "mon:stdio"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut cfg = config();
        cfg.image = "/img/a,b.raw".into();
        let argv = args(&cfg, Accelerator::Tcg);
        assert!(has_pair(&argv, "-drive", "file=/img/a,,b.raw,if=none,id=disk0,format=raw"), "{argv:?}");
    }
}
