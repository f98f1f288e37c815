//! One measurement, as every benchmark engine writes it (`--samples FILE`) and as
//! `vmbuild bench` keeps it: the JSON a researcher loads to draw their own conclusions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// What was measured, as the table's row says it ("cold find + stat, store tree").
    pub workload: String,
    /// Who did the work ("vmbuild", "virtiofsd", "vde_switch", "exec: gzip").
    pub contender: String,
    /// "s", "req/s", "Gbit/s", "kpps", "Mpps".
    pub unit: String,
    /// True for rates, false for times.
    pub higher_is_better: bool,
    /// 1-based; samples with one round number ran side by side.
    pub round: usize,
    pub value: f64,
    /// What else shaped this sample (guest memory in MiB, "warm" or "cold", ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

impl Sample {
    pub fn new(
        workload: impl Into<String>,
        contender: impl Into<String>,
        unit: &str,
        higher_is_better: bool,
        round: usize,
        value: f64,
    ) -> Sample {
        Sample {
            workload: workload.into(),
            contender: contender.into(),
            unit: unit.into(),
            higher_is_better,
            round,
            value,
            params: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Sample {
        self.params.insert(key.into(), value.into());
        self
    }
}

/// Writes `samples` to `path` as a JSON array (an engine's `--samples FILE`).
pub fn write_samples(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(samples)?)?;
    Ok(())
}

/// Reads an engine's samples file.
pub fn read_samples(path: &Path) -> anyhow::Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}
