//! Command-line settings (docs/PROTOCOL.md, "Command line").

use crate::homes::Affinity;
use crate::pool::WorkerReads;
use std::time::Duration;

pub const USAGE: &str = "usage: pyport [--generation N] [--workers N] [--max-workers N] \
[--spare-after-ms N] [--spare-idle-ms N] [--max-frame-bytes N] [--abandon-after-ms N] \
[--max-abandoned N] [--gil-watchdog-ms N] [--max-reply-bytes N] [--oom-score-adj N] \
[--max-memory-bytes N] [--thread-affinity namespace|always|none] [--log-lines-per-sec N] \
[--none-as undefined|nil|none] [--sd-decode-workers N] [--callback-timeout-ms N] [--node NAME] [--max-threads N] [--otp-release N] [--trace-latency 0|1] [--worker-reads auto|always|never] [--python-log-level N] [--python-log-format FMT] [--shm-path PATH] [--shm-size N] [--pool-generation N]";

/// A setting's value as the stats map's `config` reports it: an integer, an atom or a text.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Int(u64),
    Atom(&'static str),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub generation: u64,
    pub workers: usize,
    pub max_workers: usize,
    pub spare_after: Duration,
    pub spare_idle: Duration,
    pub max_frame: usize,
    /// A cancelled request still running this long later has its worker abandoned.
    pub abandon_after: Duration,
    /// More abandoned workers than this: the port exits so that it is restarted.
    pub max_abandoned: usize,
    /// How long a cancellation may wait for the GIL before the port gives up; `None`: for
    /// ever (`--gil-watchdog-ms 0`).
    pub gil_watchdog: Option<Duration>,
    /// Largest reply frame; a larger result fails its own request only.
    pub max_reply: usize,
    /// Which processes get a home thread.
    pub affinity: Affinity,
    pub oom_score_adj: i32,
    /// RLIMIT_AS in bytes; 0 for none.
    pub max_memory: u64,
    /// Rate limit of forwarded output lines (per stream) and of Python log records
    /// (bursts of twice as many).
    pub log_lines_per_sec: f64,
    /// The level of Python's root logger at start (a Python level number).
    pub python_log_level: u64,
    /// The format of the records forwarded to Erlang (`%(message)s` unless set).
    pub python_log_format: Option<String>,
    /// The atom Python's `None` becomes: `undefined` or `nil` (Elixir).
    pub none_as: String,
    /// Threads that read SharedDict values needing Python for Erlang (at least 1).
    pub sd_decode_workers: usize,
    /// How long a callback into Erlang made outside any call (from a thread Python code
    /// started) waits for its answer.
    pub callback_timeout: Duration,
    /// The Erlang node the port serves (pids of other nodes are checked before a send).
    pub node: String,
    /// Most worker threads of all pools together (hot workers always start).
    pub max_threads: usize,
    /// The VM's OTP release, whose `=:=` compare-and-swap follows (0: unknown, the newest).
    pub otp_release: u64,
    /// Stamp every call for the benchmark's latency breakdown (see `latency`).
    pub trace_latency: bool,
    /// Whether idle workers read requests themselves (see `pool::Turn`).
    pub worker_reads: WorkerReads,
    /// The pool's shared-memory file of SharedDicts (created by the first port that starts);
    /// `None`: a store of this port's own, in an unlinked temporary file.
    pub shm_path: Option<std::path::PathBuf>,
    /// The size bound of that file.
    pub shm_size: u64,
    /// The pool's generation, in every SharedDict handle; `None`: this port's generation.
    pub pool_generation: Option<u64>,
}

/// Default `--shm-size`: 1 GiB (sparse).
pub const DEFAULT_SHM_SIZE: u64 = 1 << 30;

impl Default for Config {
    fn default() -> Self {
        Config {
            generation: 0,
            workers: 1,
            max_workers: 16,
            spare_after: Duration::from_millis(5),
            spare_idle: Duration::from_secs(30),
            max_frame: 1 << 30,
            abandon_after: Duration::from_secs(2),
            max_abandoned: 64,
            gil_watchdog: Some(Duration::from_secs(5)),
            max_reply: 1 << 30,
            affinity: Affinity::Namespace,
            oom_score_adj: 500,
            max_memory: 0,
            log_lines_per_sec: 100.0,
            python_log_level: 30,
            python_log_format: None,
            none_as: "undefined".into(),
            sd_decode_workers: 2,
            callback_timeout: Duration::from_secs(30),
            node: String::new(),
            max_threads: 64,
            otp_release: 0,
            trace_latency: false,
            worker_reads: WorkerReads::Auto,
            shm_path: None,
            shm_size: DEFAULT_SHM_SIZE,
            pool_generation: None,
        }
    }
}

impl Config {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Config, String> {
        let mut cfg = Config::default();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            if flag == "--thread-affinity" {
                cfg.affinity = Affinity::parse(&value)
                    .ok_or_else(|| format!("{flag}: {value:?} is not namespace, always or none"))?;
                continue;
            }
            if flag == "--python-log-format" {
                cfg.python_log_format = Some(value);
                continue;
            }
            if flag == "--worker-reads" {
                cfg.worker_reads = WorkerReads::parse(&value)
                    .ok_or_else(|| format!("{flag}: {value:?} is not auto, always or never"))?;
                continue;
            }
            if flag == "--shm-path" {
                cfg.shm_path = Some(value.into());
                continue;
            }
            if flag == "--node" {
                cfg.node = value;
                continue;
            }
            if flag == "--none-as" {
                if !["undefined", "nil", "none"].contains(&value.as_str()) {
                    return Err(format!("--none-as: {value:?} is not undefined, nil or none"));
                }
                cfg.none_as = value;
                continue;
            }
            let n: u64 = value.parse().map_err(|_| format!("{flag}: {value:?} is not a non-negative integer"))?;
            match flag.as_str() {
                "--generation" => cfg.generation = n,
                "--workers" => cfg.workers = n as usize,
                "--max-workers" => cfg.max_workers = n as usize,
                "--spare-after-ms" => cfg.spare_after = Duration::from_millis(n),
                "--spare-idle-ms" => cfg.spare_idle = Duration::from_millis(n),
                "--max-frame-bytes" => cfg.max_frame = n as usize,
                "--abandon-after-ms" => cfg.abandon_after = Duration::from_millis(n),
                "--max-abandoned" => cfg.max_abandoned = n as usize,
                "--gil-watchdog-ms" => cfg.gil_watchdog = (n > 0).then(|| Duration::from_millis(n)),
                "--max-reply-bytes" => cfg.max_reply = n as usize,
                "--oom-score-adj" => cfg.oom_score_adj = n.min(1000) as i32,
                "--max-memory-bytes" => cfg.max_memory = n,
                "--log-lines-per-sec" => cfg.log_lines_per_sec = n.max(1) as f64,
                "--python-log-level" => cfg.python_log_level = n,
                "--sd-decode-workers" => cfg.sd_decode_workers = n.clamp(1, 64) as usize,
                "--callback-timeout-ms" => cfg.callback_timeout = Duration::from_millis(n),
                "--max-threads" => cfg.max_threads = n.max(1) as usize,
                "--otp-release" => cfg.otp_release = n,
                "--trace-latency" => cfg.trace_latency = n > 0,
                "--shm-size" => cfg.shm_size = n,
                "--pool-generation" => cfg.pool_generation = Some(n),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if cfg.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        cfg.max_workers = cfg.max_workers.max(cfg.workers);
        Ok(cfg)
    }

    /// The generation SharedDict handles carry: the pool's, else this port's.
    pub fn handle_generation(&self) -> u64 {
        self.pool_generation.unwrap_or(self.generation)
    }
}

impl Config {
    /// The settings the port applies, defaults included, named as the application env
    /// names them (docs/PROTOCOL.md, "Stats map"): so that the defaults a user relies on
    /// can be read from the running port rather than from documentation.
    pub fn report(&self) -> Vec<(&'static str, Setting)> {
        use Setting::{Atom, Int, Text};
        let ms = |d: Duration| Int(d.as_millis() as u64);
        let none_as = match self.none_as.as_str() {
            "nil" => "nil",
            "none" => "none",
            _ => "undefined",
        };
        vec![
            ("workers", Int(self.workers as u64)),
            ("max_workers", Int(self.max_workers as u64)),
            ("spare_after_ms", ms(self.spare_after)),
            ("spare_idle_ms", ms(self.spare_idle)),
            ("max_frame_bytes", Int(self.max_frame as u64)),
            ("abandon_after_ms", ms(self.abandon_after)),
            ("max_abandoned_workers", Int(self.max_abandoned as u64)),
            ("gil_watchdog_ms", self.gil_watchdog.map_or(Atom("infinity"), ms)),
            ("max_reply_bytes", Int(self.max_reply as u64)),
            ("thread_affinity", affinity_setting(self.affinity)),
            ("oom_score_adj", Int(self.oom_score_adj.max(0) as u64)),
            ("max_memory_bytes", if self.max_memory == 0 { Atom("undefined") } else { Int(self.max_memory) }),
            ("log_lines_per_sec", Int(self.log_lines_per_sec as u64)),
            ("none_as", Atom(none_as)),
            ("sd_decode_workers", Int(self.sd_decode_workers as u64)),
            ("callback_timeout", ms(self.callback_timeout)),
            ("max_threads", Int(self.max_threads as u64)),
            ("trace_latency", Atom(if self.trace_latency { "true" } else { "false" })),
            ("worker_reads", worker_reads_setting(self.worker_reads)),
            ("python_log_level", Int(self.python_log_level)),
            ("python_log_format", Text(self.python_log_format.clone().unwrap_or_else(|| "%(message)s".into()))),
            ("shared_dict_memory", Int(self.shm_size)),
        ]
    }
}

fn affinity_setting(a: Affinity) -> Setting {
    match a {
        Affinity::Namespace => Setting::Atom("namespace"),
        Affinity::Always => Setting::Atom("always"),
        Affinity::None => Setting::Atom("none"),
    }
}

fn worker_reads_setting(w: WorkerReads) -> Setting {
    match w {
        WorkerReads::Auto => Setting::Atom("auto"),
        WorkerReads::Always => Setting::Atom("always"),
        WorkerReads::Never => Setting::Atom("never"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse(&[]).unwrap(), Config::default());
        let c = parse(&["--workers", "4", "--max-workers", "2", "--generation", "7"]).unwrap();
        assert_eq!((c.workers, c.max_workers, c.generation), (4, 4, 7));
        let c = parse(&["--gil-watchdog-ms", "0", "--max-reply-bytes", "100"]).unwrap();
        assert_eq!((c.gil_watchdog, c.max_reply), (None, 100));
        assert_eq!(parse(&["--thread-affinity", "none"]).unwrap().affinity, Affinity::None);
        assert_eq!(parse(&["--gil-watchdog-ms", "250"]).unwrap().gil_watchdog, Some(Duration::from_millis(250)));
        assert_eq!(parse(&[]).unwrap().sd_decode_workers, 2);
        assert_eq!(parse(&["--sd-decode-workers", "0"]).unwrap().sd_decode_workers, 1);
        assert!(!parse(&[]).unwrap().trace_latency);
        assert!(parse(&["--trace-latency", "1"]).unwrap().trace_latency);
        assert_eq!(parse(&[]).unwrap().worker_reads, WorkerReads::Auto);
        assert_eq!(parse(&["--worker-reads", "always"]).unwrap().worker_reads, WorkerReads::Always);
        assert_eq!(parse(&["--worker-reads", "never"]).unwrap().worker_reads, WorkerReads::Never);
        let c = parse(&["--generation", "3"]).unwrap();
        assert_eq!((c.shm_path.clone(), c.shm_size, c.handle_generation()), (None, DEFAULT_SHM_SIZE, 3));
        let c = parse(&["--shm-path", "/dev/shm/x.sd", "--shm-size", "1048576", "--pool-generation", "9", "--generation", "3"]).unwrap();
        assert_eq!(c.shm_path.as_deref(), Some(std::path::Path::new("/dev/shm/x.sd")));
        assert_eq!((c.shm_size, c.handle_generation()), (1 << 20, 9));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(parse(&["--workers"]).is_err());
        assert!(parse(&["--workers", "x"]).is_err());
        assert!(parse(&["--workers", "0"]).is_err());
        assert!(parse(&["--bogus", "1"]).is_err());
        assert!(parse(&["--thread-affinity", "sometimes"]).is_err());
        assert!(parse(&["--none-as", "null"]).is_err());
        assert!(parse(&["--worker-reads", "sometimes"]).is_err());
    }

    /// The stats map's `config`: every setting, named as the app env names it, defaults as
    /// applied (`infinity` for no watchdog, `undefined` for no memory cap), flags as given.
    #[test]
    fn report_names_every_setting_as_applied() {
        use Setting::{Atom, Int};
        let names: Vec<&str> = parse(&[]).unwrap().report().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "workers", "max_workers", "spare_after_ms", "spare_idle_ms", "max_frame_bytes",
                "abandon_after_ms", "max_abandoned_workers", "gil_watchdog_ms", "max_reply_bytes",
                "thread_affinity", "oom_score_adj", "max_memory_bytes", "log_lines_per_sec",
                "none_as", "sd_decode_workers", "callback_timeout", "max_threads",
                "trace_latency", "worker_reads", "python_log_level", "python_log_format",
                "shared_dict_memory",
            ]
        );
        let get = |args: &[&str], key: &str| {
            parse(args).unwrap().report().into_iter().find(|(k, _)| *k == key).map(|(_, v)| v).unwrap()
        };
        assert_eq!(get(&[], "callback_timeout"), Int(30_000));
        assert_eq!(get(&[], "max_abandoned_workers"), Int(64));
        assert_eq!(get(&[], "max_threads"), Int(64));
        assert_eq!(get(&[], "gil_watchdog_ms"), Int(5000));
        assert_eq!(get(&["--gil-watchdog-ms", "0"], "gil_watchdog_ms"), Atom("infinity"));
        assert_eq!(get(&[], "max_memory_bytes"), Atom("undefined"));
        assert_eq!(get(&["--max-memory-bytes", "4096"], "max_memory_bytes"), Int(4096));
        assert_eq!(get(&[], "thread_affinity"), Atom("namespace"));
        assert_eq!(get(&["--thread-affinity", "always"], "thread_affinity"), Atom("always"));
        assert_eq!(get(&["--thread-affinity", "none"], "thread_affinity"), Atom("none"));
        assert_eq!(get(&[], "worker_reads"), Atom("auto"));
        assert_eq!(get(&["--worker-reads", "always"], "worker_reads"), Atom("always"));
        assert_eq!(get(&["--worker-reads", "never"], "worker_reads"), Atom("never"));
        assert_eq!(get(&[], "none_as"), Atom("undefined"));
        assert_eq!(get(&["--none-as", "nil"], "none_as"), Atom("nil"));
        assert_eq!(get(&["--none-as", "none"], "none_as"), Atom("none"));
        assert_eq!(get(&[], "python_log_level"), Int(30));
        assert_eq!(get(&["--python-log-level", "10"], "python_log_level"), Int(10));
        assert_eq!(get(&[], "python_log_format"), Setting::Text("%(message)s".into()));
        assert_eq!(get(&["--python-log-format", "%(name)s"], "python_log_format"), Setting::Text("%(name)s".into()));
        assert_eq!(get(&[], "trace_latency"), Atom("false"));
        assert_eq!(get(&["--trace-latency", "1"], "trace_latency"), Atom("true"));
        assert_eq!(get(&["--spare-after-ms", "7"], "spare_after_ms"), Int(7));
        assert_eq!(get(&["--oom-score-adj", "700"], "oom_score_adj"), Int(700));
        assert_eq!(get(&[], "shared_dict_memory"), Int(1 << 30));
        assert_eq!(get(&["--shm-size", "1048576"], "shared_dict_memory"), Int(1 << 20));
    }

    #[test]
    fn none_as_and_log_rate() {
        assert_eq!(parse(&["--none-as", "nil"]).unwrap().none_as, "nil");
        assert_eq!(parse(&["--none-as", "none"]).unwrap().none_as, "none");
        assert_eq!(parse(&[]).unwrap().none_as, "undefined");
        assert_eq!(parse(&["--log-lines-per-sec", "0"]).unwrap().log_lines_per_sec, 1.0);
        assert_eq!(parse(&["--log-lines-per-sec", "7"]).unwrap().log_lines_per_sec, 7.0);
        assert_eq!(parse(&[]).unwrap().python_log_level, 30, "Python's own default: WARNING");
        assert_eq!(parse(&["--python-log-level", "20"]).unwrap().python_log_level, 20);
        assert_eq!(parse(&["--python-log-format", "%(name)s: %(message)s"]).unwrap().python_log_format.as_deref(), Some("%(name)s: %(message)s"));
    }
}
