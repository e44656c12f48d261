//! A labelled counter family whose counters are found again by their label values as borrowed strings.
//! prometheus-client's `Family` is looked up by its owned label set (a `String` built per value) hashed
//! with SipHash; every request counts several such series. Here, after a label set's first use, counting
//! allocates nothing and hashes with foldhash; the family itself is what the registry encodes.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A series' label values, in the label set's order (unused ones empty): at most three here.
pub type Values<'a> = [&'a str; 3];

/// What the handle map is looked up by: its own keys, or borrowed values.
trait Key {
    fn values(&self) -> Values<'_>;
}

/// A series' label values as owned strings: the handle map's key.
struct Owned([Box<str>; 3]);

impl Key for Owned {
    fn values(&self) -> Values<'_> {
        [&self.0[0], &self.0[1], &self.0[2]]
    }
}

impl Key for Values<'_> {
    fn values(&self) -> Values<'_> {
        *self
    }
}

impl std::fmt::Debug for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.values().fmt(f)
    }
}

impl<'a> Borrow<dyn Key + 'a> for Owned {
    fn borrow(&self) -> &(dyn Key + 'a) {
        self
    }
}

// Owned and borrowed keys hash and compare by the same values, as `Borrow` requires.
impl Hash for Owned {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.values().hash(state);
    }
}

impl Hash for dyn Key + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.values().hash(state);
    }
}

impl PartialEq for Owned {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl Eq for Owned {}

impl PartialEq for dyn Key + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl Eq for dyn Key + '_ {}

/// A counter family and a handle for each of its series, by label values.
#[derive(Debug)]
pub struct Counters<L> {
    family: Family<L, Counter>,
    handles: RwLock<HashMap<Owned, Counter, foldhash::fast::RandomState>>,
}

impl<L> Default for Counters<L>
where
    L: Clone + Hash + Eq,
{
    fn default() -> Self {
        Self { family: Family::default(), handles: RwLock::default() }
    }
}

impl<L> Counters<L>
where
    L: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    /// The family, for the registry.
    pub fn family(&self) -> Family<L, Counter> {
        self.family.clone()
    }

    /// Adds `by` to the series whose label values are `values`; `labels` builds its label set the
    /// first time (it must hold the same values).
    pub fn inc_by(&self, values: Values<'_>, by: u64, labels: impl FnOnce() -> L) {
        let handles = self.handles.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(counter) = handles.get(&values as &dyn Key) {
            counter.inc_by(by);
            return;
        }
        drop(handles);
        let counter = self.family.get_or_create(&labels()).clone();
        counter.inc_by(by);
        let owned = Owned(values.map(Box::from));
        self.handles.write().unwrap_or_else(PoisonError::into_inner).entry(owned).or_insert(counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        model: String,
        kind: &'static str,
    }

    fn labels(model: &str, kind: &'static str) -> Labels {
        Labels { model: model.to_string(), kind }
    }

    #[test]
    fn counts_reach_the_family_once_per_series_and_a_series_is_built_once() {
        let counters = Counters::<Labels>::default();
        let mut registry = Registry::default();
        registry.register("tokens", "Tokens", counters.family());
        let mut built = 0;
        for (model, kind, by) in [("a", "prompt", 3), ("a", "prompt", 4), ("a", "completion", 5), ("b", "prompt", 1)] {
            counters.inc_by([model, kind, ""], by, || {
                built += 1;
                labels(model, kind)
            });
        }
        assert_eq!(built, 3, "a series' label set is built the first time only");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"tokens_total{model="a",kind="prompt"} 7"#), "{text}");
        assert!(text.contains(r#"tokens_total{model="a",kind="completion"} 5"#), "{text}");
        assert!(text.contains(r#"tokens_total{model="b",kind="prompt"} 1"#), "{text}");
    }

    #[test]
    fn values_that_only_differ_in_where_they_split_are_different_series() {
        let counters = Counters::<Labels>::default();
        counters.inc_by(["ab", "", ""], 1, || labels("ab", ""));
        counters.inc_by(["a", "b", ""], 1, || labels("a", "b"));
        assert_eq!(counters.handles.read().unwrap().len(), 2);
    }
}
