//! What this instance tells its cluster besides the lanes (`cluster::Facts`): the configured clients'
//! tokens of the day from the ledger, the keys and accounts of the generation in force that the upstream
//! refused — and how it follows what the cluster knows (admission stops or resumes the accounts).

use std::sync::{Arc, PoisonError, RwLock, Weak};

use super::ledger::Ledger;
use super::Generation;
use crate::admission::Admission;
use crate::cluster::{Facts, Local, Shared};

pub struct InstanceFacts {
    pub current: Weak<RwLock<Arc<Generation>>>,
    pub ledger: Weak<Ledger>,
    pub admission: Admission,
}

impl InstanceFacts {
    fn generation(&self) -> Option<Arc<Generation>> {
        Some(self.current.upgrade()?.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl Facts for InstanceFacts {
    fn local(&self) -> Option<Local> {
        let (generation, ledger) = (self.generation()?, self.ledger.upgrade()?);
        let (utc_day, id, tokens) = ledger.totals();
        let (paused, resumed) = generation.accounts.own_pauses();
        let refused = generation.accounts.refused_fingerprints();
        Some(Local { utc_day, ledger: id, tokens, refused, paused, resumed })
    }

    fn follow(&self, shared: Shared) {
        if let Some(ledger) = self.ledger.upgrade() {
            ledger.shared(shared.utc_day, shared.written, shared.tokens);
        }
        let Some(generation) = self.generation() else { return };
        let accounts = &generation.accounts;
        accounts.told_resumed(&shared.resumed);
        let changed = accounts.follow_refusals(&shared.refused).into_iter();
        for (account, serving) in changed.chain(accounts.follow_pauses(&shared.paused)) {
            self.admission.set_account_enabled(&account, serving);
        }
    }
}
