//! The balance watch: every `upstream.balance.poll` from start (and at once after a reload) each
//! account's `GET /user/balance` is read; an account paused for its balance (402) serves again as soon as the
//! upstream says it is available. Also the view of the accounts that metrics read at scrape time.

use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::Generation;
use crate::admission::Admission;
use crate::observe::AccountsSource;
use crate::upstream::balance;

/// How often the watch looks whether a poll is due, when polling is off.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// Reads balances until the proxy is gone.
pub async fn watch(current: Weak<RwLock<Arc<Generation>>>, admission: Admission, read_now: Arc<Notify>) {
    loop {
        let Some(poll) = in_force(&current).map(|g| g.config.upstream.balance.poll) else { return };
        let wait = if poll.is_zero() { IDLE_CHECK } else { poll };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = read_now.notified() => {}
        }
        let Some(generation) = in_force(&current) else { return };
        if !generation.config.upstream.balance.poll.is_zero() && generation.accounts.keyed() {
            read_all(&generation, &admission).await;
        }
    }
}

/// The generation in force, while the proxy lives.
fn in_force(current: &Weak<RwLock<Arc<Generation>>>) -> Option<Arc<Generation>> {
    current.upgrade().map(|c| c.read().unwrap_or_else(PoisonError::into_inner).clone())
}

/// Reads every account's balance once.
async fn read_all(generation: &Generation, admission: &Admission) {
    let names: Vec<String> = generation.accounts.names().map(str::to_owned).collect();
    for account in names {
        let Some((_, key)) = generation.accounts.key(&account) else { continue };
        match balance::read(&generation.upstream, key).await {
            Ok(read) => {
                if generation.accounts.balance_read(&account, read) {
                    admission.set_account_enabled(&account, true);
                }
            }
            Err(err) => tracing::warn!(account, error = %err, "cannot read the account's balance"),
        }
    }
}

/// The accounts as metrics see them at scrape time: the generation in force, and the low-balance mark.
pub fn accounts_source(current: &Arc<RwLock<Arc<Generation>>>) -> AccountsSource {
    let current = Arc::downgrade(current);
    Box::new(move || {
        let Some(current) = current.upgrade() else { return (Vec::new(), 0.0) };
        let generation = current.read().unwrap_or_else(PoisonError::into_inner).clone();
        (generation.accounts.views(), generation.config.upstream.balance.low)
    })
}
