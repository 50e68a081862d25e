//! Durations in configuration as people write them: `"500ms"`, `"30s"`, `"5m"`,
//! `"1h30m"`, `"7d"` (humantime), everywhere the same. A bare number is refused: its unit
//! would be a guess.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Reads a duration such as `"30s"`.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!(
            "{s:?} is not a duration ({e}); write it like \"500ms\", \"30s\", \"5m\" or \"1h30m\""
        )
    })
}

/// Writes a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serde: writes a duration as its text (`#[serde(with = "runtime::duration")]`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// Serde: reads a duration from its text; a bare number is an error naming the units.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = Text::deserialize(d)?;
    parse(&text.0).map_err(serde::de::Error::custom)
}

/// A string, or a clear error for anything else (a bare number in particular).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"30s\" or \"5m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                Err(E::custom(format!(
                    "{v} has no unit; write a duration such as \"{v}ms\" or \"{v}s\""
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                self.visit_i64(v as i64)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The same for a list of durations.
pub mod list {
    use super::*;

    /// Serde: writes each duration as its text.
    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| super::format(*d)))
    }

    /// Serde: reads a list of duration texts.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let texts = Vec::<Text>::deserialize(d)?;
        texts
            .iter()
            .map(|t| parse(&t.0).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The same for an optional duration (absent: `None`).
pub mod option {
    use super::*;

    /// Serde: writes the duration's text, or none.
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Serde: reads a present duration's text (with `#[serde(default)]` for an absent one).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

/// A value of a saga's settings: a duration (`"2m"`) or a count (`3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// A text such as `"2m"`.
    Duration(Duration),
    /// A bare number, such as an attempt count.
    Count(u64),
}

impl serde::Serialize for Setting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Setting::Duration(d) => serialize(d, s),
            Setting::Count(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Setting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Setting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"2m\", or a count")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Setting, E> {
                parse(v).map(Setting::Duration).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Setting, E> {
                Ok(Setting::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Setting, E> {
                u64::try_from(v)
                    .map(Setting::Count)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
    struct T {
        #[serde(with = "crate::duration")]
        d: Duration,
        #[serde(with = "crate::duration::list")]
        l: Vec<Duration>,
    }

    #[test]
    fn durations_are_written_with_their_unit() {
        let t: T = toml::from_str("d = \"1h30m\"\nl = [\"0s\", \"100ms\", \"5s\"]").unwrap();
        assert_eq!(t.d, Duration::from_secs(5400));
        assert_eq!(t.l, [0, 100, 5000].map(Duration::from_millis).to_vec());
        let back: T = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let bare = toml::from_str::<T>("d = 30\nl = []")
            .unwrap_err()
            .to_string();
        assert!(bare.contains("30 has no unit"), "{bare}");
        let bad = toml::from_str::<T>("d = \"soon\"\nl = []")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("is not a duration"), "{bad}");
    }

    #[test]
    fn saga_settings_are_durations_or_counts() {
        let m: std::collections::BTreeMap<String, Setting> =
            toml::from_str("awaiting = \"2m\"\nmax_attempts = 3").unwrap();
        assert_eq!(m["awaiting"], Setting::Duration(Duration::from_secs(120)));
        assert_eq!(m["max_attempts"], Setting::Count(3));
    }
}
