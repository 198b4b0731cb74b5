//! How a generation decodes, as one typed value chosen in one place: AR, or speculative
//! decoding with a drafter, a layout of the step and a mask count. The rows and positions a
//! step needs come from here ([`Layout::rows`], [`Strategy::reach`]) and nowhere else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::speculative::Drafter;
use crate::error::{Error, Result};

/// The decoding mode as users name it (CLI `--mode`, the GUI's lanes, bench rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One token per forward pass (the baseline).
    #[default]
    Ar,
    /// Drafts then one mask block (the paper's ablation).
    Linear,
    /// A mask block after every regular row (the method).
    Quadratic,
}

impl Mode {
    /// All modes.
    pub const ALL: [Mode; 3] = [Mode::Ar, Mode::Linear, Mode::Quadratic];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ar => "ar",
            Mode::Linear => "linear",
            Mode::Quadratic => "quadratic",
        }
    }

    /// The speculative layout, or `None` for AR.
    pub fn layout(self) -> Option<Layout> {
        match self {
            Mode::Ar => None,
            Mode::Linear => Some(Layout::Linear),
            Mode::Quadratic => Some(Layout::Quadratic),
        }
    }
}

named_choices!(Mode, "mode");

/// Where a speculative step puts its mask blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// One block, after the last draft (the paper's ablation).
    Linear,
    /// A block after the verified token and after every draft (the method).
    Quadratic,
}

impl Layout {
    /// The number of rows of one step's forward pass with `drafts` drafts and `masks`
    /// masks per block: the one formula every caller uses.
    pub fn rows(self, drafts: usize, masks: usize) -> usize {
        match self {
            Layout::Quadratic => (drafts + 1) * (masks + 1),
            Layout::Linear => drafts + 1 + masks,
        }
    }
}

/// How many masks each step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskCount {
    /// The same number every step.
    Fixed(usize),
    /// Chosen each step from the recent acceptance, up to the adapter's k
    /// ([`super::speculative::MaskController`]).
    Auto,
}

impl MaskCount {
    /// The most masks a step may use with an adapter trained with `k`.
    pub fn max(self, k: usize) -> usize {
        match self {
            MaskCount::Fixed(m) => m,
            MaskCount::Auto => k,
        }
    }

    /// Check against an adapter trained with `k` masks.
    pub fn check(self, k: usize) -> Result<()> {
        match self {
            MaskCount::Fixed(m) if m == 0 || m > k => Err(Error::Invalid(format!(
                "{m} masks is out of range: the adapter was trained with k = {k} masks (use 1 to {k}, or auto)"
            ))),
            _ => Ok(()),
        }
    }
}

impl Default for MaskCount {
    fn default() -> Self {
        MaskCount::Fixed(1)
    }
}

impl fmt::Display for MaskCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskCount::Fixed(m) => write!(f, "{m}"),
            MaskCount::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for MaskCount {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(MaskCount::Auto);
        }
        s.parse::<usize>()
            .map(MaskCount::Fixed)
            .map_err(|_| Error::Invalid(format!("`{s}` is not a mask count (a number, or auto)")))
    }
}

/// In JSON: a number, or the string `"auto"`.
impl Serialize for MaskCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            MaskCount::Fixed(m) => s.serialize_u64(*m as u64),
            MaskCount::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for MaskCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(m) => Ok(MaskCount::Fixed(m)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Speculative decoding's settings.
#[derive(Debug, Clone, Copy)]
pub struct Speculative<'a> {
    /// The adapter, prepared for decoding.
    pub drafter: &'a Drafter,
    /// Where the mask blocks go.
    pub layout: Layout,
    /// Masks per step.
    pub masks: MaskCount,
}

/// How to decode.
#[derive(Debug, Clone, Copy)]
pub enum Strategy<'a> {
    /// One token per forward pass.
    Ar,
    /// Drafts from the model's own mask tokens, verified in the next forward pass.
    Speculative(Speculative<'a>),
}

impl<'a> Strategy<'a> {
    /// The strategy for `mode`: AR ignores the drafter and the masks; linear and quadratic
    /// need a drafter and a mask count it was trained for.
    pub fn new(mode: Mode, drafter: Option<&'a Drafter>, masks: MaskCount) -> Result<Self> {
        let Some(layout) = mode.layout() else { return Ok(Strategy::Ar) };
        let drafter = drafter.ok_or_else(|| Error::Invalid(format!("{mode} decoding needs an MTP adapter")))?;
        masks.check(drafter.k())?;
        Ok(Strategy::Speculative(Speculative { drafter, layout, masks }))
    }

    /// The most masks a step uses (0 for AR).
    pub fn max_masks(&self) -> usize {
        match self {
            Strategy::Ar => 0,
            Strategy::Speculative(s) => s.masks.max(s.drafter.k()),
        }
    }

    /// Positions past the last emitted token that one step may touch: a mask after the
    /// last draft sits `drafts + masks` ahead. A request needs this much room in the
    /// context beyond its prompt and new tokens.
    pub fn reach(&self) -> usize {
        match self {
            Strategy::Ar => 0,
            Strategy::Speculative(_) => 2 * self.max_masks() + 1,
        }
    }

    /// The most rows one forward pass appends to the KV cache.
    pub fn max_rows(&self) -> usize {
        match self {
            Strategy::Ar => 1,
            Strategy::Speculative(s) => {
                let m = self.max_masks();
                s.layout.rows(m, m)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_each_layout() {
        assert_eq!(Layout::Quadratic.rows(4, 4), 25);
        assert_eq!(Layout::Quadratic.rows(0, 3), 4);
        assert_eq!(Layout::Linear.rows(2, 2), 5);
        assert_eq!(Layout::Linear.rows(0, 4), 5);
    }

    #[test]
    fn mask_counts_parse_and_serialise() -> Result<()> {
        assert_eq!("auto".parse::<MaskCount>()?, MaskCount::Auto);
        assert_eq!(" 3".parse::<MaskCount>()?, MaskCount::Fixed(3));
        assert!("three".parse::<MaskCount>().is_err());
        for m in [MaskCount::Fixed(2), MaskCount::Auto] {
            let json = serde_json::to_string(&m).map_err(|e| Error::Invalid(e.to_string()))?;
            assert_eq!(serde_json::from_str::<MaskCount>(&json).map_err(|e| Error::Invalid(e.to_string()))?, m);
        }
        assert_eq!(serde_json::to_string(&MaskCount::Fixed(2)).ok().as_deref(), Some("2"));
        assert!(MaskCount::Fixed(5).check(4).is_err() && MaskCount::Fixed(0).check(4).is_err());
        assert!(MaskCount::Auto.check(4).is_ok() && MaskCount::Fixed(4).check(4).is_ok());
        assert_eq!(MaskCount::Auto.max(8), 8);
        Ok(())
    }
}
