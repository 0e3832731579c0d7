//! The task messages this node holds, and the prefetch (`basic.qos`) that
//! lets the broker send it more: the broker offers the node a message only
//! when one of its CONCURRENCY slots is free.
//!
//! Owns the acks of held task messages and every prefetch value of the
//! consuming channel (a new channel's first one is sent by the broker's
//! session set-up, with the value [`Prefetch::next_session`] gives). It
//! must not decide when a task starts or ends (the worker does, and tells
//! it here), nor read messages.
//!
//! # Why no message reaches a node that cannot start it
//!
//! RabbitMQ sends a consuming channel another message while its unacked
//! count is below the channel's prefetch (global QoS), and it handles one
//! channel's frames in the order they arrive: a `basic.qos` answered with
//! `qos-ok` is in force for every frame sent after it on that channel.
//!
//! Each held message is one of:
//! - a task holding a slot, or waiting for one: counted once in the unacked
//!   count, once in the slots;
//! - a task whose slot is free again while its final event waits for the
//!   broker's confirm, an `eta` task held until its time, a redelivery
//!   of a task already here, a redelivery held while the farm is asked
//!   whether another node runs it ([`crate::farm`]), or an `eta` message
//!   beyond MAX_ETA_HELD while its copy goes back to its queue (a bounded
//!   number at once, under a key no task id has): unacked, but holding
//!   no slot. One that turns out to run here is taken back
//!   ([`Prefetch::take`]) and held again wanting a slot, then settled: like
//!   an `eta` task whose time came, the broker may have filled its room
//!   meanwhile.
//!
//! The node asks for `prefetch = CONCURRENCY + held_here - wanting_slots`
//! (held_here: this channel's unacked messages the book holds;
//! wanting_slots: tasks holding or waiting for a slot). The broker sends
//! more while `unacked < prefetch`, and since `unacked = held_here` plus the
//! messages in flight to us, that is exactly while
//! `wanting_slots + in flight < CONCURRENCY`: while a slot is free. The
//! formula holds at every instant, as the broker sees it, because:
//!
//! - a change that gives the node room (a slot freed, a message held that
//!   needs no slot) is made here first and the higher prefetch is sent
//!   after: until it lands the broker uses the lower one, which only
//!   delays a refill;
//! - a change that takes room away from the broker's view, an ack, is
//!   preceded by the lower prefetch, and the ack is sent only once
//!   `qos-ok` came back: the broker never sees the ack under the old,
//!   higher prefetch (the other order, ack first and the lower prefetch
//!   after, let a third message slip in between on a node with two slots
//!   whenever two tasks ended close together);
//! - every prefetch change and every ack of a held message is made by one
//!   task (the gate, which alone holds the channel), one request at a time,
//!   and each value is computed from the book when its turn comes, so no
//!   raise computed before an ack's lower can land after that ack. Each
//!   turn acks every task that ended meanwhile after one prefetch change
//!   for all of them (a slot freed and a task ended cancel out: no `qos` at
//!   all). The price is one broker round trip per task end before its ack,
//!   taken in turn;
//! - a delivered task that takes a slot adds one held message and one slot
//!   wanted at once: no change, no frame.
//!
//! Hence the broker's unacked count for the node is at most CONCURRENCY,
//! plus the tasks that ended and whose ack is in flight, plus the `eta`
//! tasks held and the redeliveries of tasks running here. Two exceptions,
//! both bounded: an `eta` task whose time comes while every slot is busy
//! waits for one (the broker gave its slot to another message meanwhile),
//! and messages acked at once without running (undecodable, unknown,
//! expired, revoked, already ended) are not counted, which only makes the
//! node take less while their ack is on its way.
//!
//! After a reconnect the new channel holds none of the old messages: the
//! tasks still running count as slots wanted with no message here, so the
//! node asks only for its free slots. AMQP reads a prefetch of 0 as "no
//! limit", so with every slot busy it would ask for 1; it consumes nothing
//! then instead.
//!
//! # A full node consumes nothing
//!
//! The prefetch alone cannot say "none": RabbitMQ has no client flow
//! control for consumers. So the book also says when every slot is wanted
//! ([`Prefetch::full`], a `watch` updated on every change of the book), and
//! the worker cancels its task consumers while it is (`basic.cancel`) and
//! consumes again when a slot frees; a session that starts full starts
//! without consumers. A delivery that crossed the cancel finds no free slot
//! and goes back to the broker at once (the worker's admission).
//!
//! # A message is acked only on the channel it came on, while it is open
//!
//! [`Prefetch::take`] refuses a message whose channel is not open any more
//! (lapin wakes every consumer with a dead connection's error, and a task
//! started on such a message would run while the broker gives the message
//! to another node). A prefetch change the broker refuses, or does not
//! answer within 30 s, ends the session ([`Prefetch::attach`]'s `broken`):
//! the tasks that ended meanwhile are not acked (their messages go back
//! with the channel, and the record of ended tasks answers their
//! redeliveries), and the next session gets a prefetch in line again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::{Acker, Channel};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::set_prefetch;

/// How long a prefetch change may take before the channel is taken for
/// broken (the session loop reconnects and attaches a new one).
const QOS_TIMEOUT: Duration = Duration::from_secs(30);

/// The held task messages and the consuming channel's prefetch.
pub struct Prefetch {
    concurrency: usize,
    /// The only lock; never held across an await.
    book: Arc<Mutex<Book<Acker>>>,
    /// To the gate, the task that holds the consuming channel and makes
    /// every prefetch change and every ack of a held message, in turn;
    /// started on first use, on the runtime.
    gate: OnceLock<mpsc::UnboundedSender<Turn>>,
    /// The prefetch last set on the channel (`inspect stats`).
    in_force: Arc<AtomicU16>,
    /// Whether every slot is wanted (see [`Prefetch::full`]).
    full: Arc<watch::Sender<bool>>,
}

/// The held messages (`A`: how one is acked).
struct Book<A> {
    /// Bumped for every new broker session: messages of older sessions are
    /// no longer unacked on the channel in use.
    session: u64,
    held: HashMap<String, Held<A>>,
    /// Tasks over, whose messages the next holder of the gate acks (one
    /// prefetch change for all the tasks that ended meanwhile).
    ending: Vec<String>,
    /// The current session's consuming channel, once attached: a message
    /// is taken back ([`Prefetch::take`]) only while it is open.
    channel: Option<Channel>,
}

impl<A> Default for Book<A> {
    fn default() -> Self {
        Self {
            session: 0,
            held: HashMap::new(),
            ending: Vec::new(),
            channel: None,
        }
    }
}

struct Held<A> {
    /// Holding a slot, or waiting for one.
    wants_slot: bool,
    /// The task's message and its redeliveries, with the session each came
    /// on.
    ackers: Vec<(A, u64)>,
}

impl<A> Book<A> {
    /// Whether every slot is wanted: by a task running, adopted, or
    /// waiting for one.
    fn full(&self, concurrency: usize) -> bool {
        self.held.values().filter(|held| held.wants_slot).count() >= concurrency
    }

    fn wanted(&self, concurrency: usize) -> u16 {
        let mut credit = i64::try_from(concurrency).unwrap_or(i64::MAX);
        for held in self.held.values() {
            let here = held
                .ackers
                .iter()
                .filter(|(_, session)| *session == self.session)
                .count();
            credit = credit.saturating_add(i64::try_from(here).unwrap_or(i64::MAX));
            credit -= i64::from(held.wants_slot);
        }
        prefetch_of(credit)
    }
}

/// The prefetch for `credit` messages: at least 1 (0 means "no limit" to
/// AMQP), at most what the field holds.
fn prefetch_of(credit: i64) -> u16 {
    u16::try_from(credit.max(1)).unwrap_or(u16::MAX)
}

fn lock<A>(book: &Mutex<Book<A>>) -> MutexGuard<'_, Book<A>> {
    book.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tells the watchers of [`Prefetch::full`] what `book` says now, if that
/// changed. Called with the book's lock held, after each change: the
/// watch's own lock is a leaf.
fn tell_full<A>(book: &Book<A>, concurrency: usize, full: &watch::Sender<bool>) {
    let now = book.full(concurrency);
    full.send_if_modified(|was| std::mem::replace(was, now) != now);
}

/// What the gate is asked to do, and where it says it is done.
enum Turn {
    /// A new broker session: no channel until the next `Attach`; answers
    /// the prefetch to open the new one with.
    NextSession(oneshot::Sender<u16>),
    Attach {
        channel: Channel,
        applied: u16,
        broken: CancellationToken,
        done: oneshot::Sender<()>,
    },
    /// Brings the prefetch in line and acks the tasks that ended.
    Settle(oneshot::Sender<()>),
}

/// The consuming channel and its prefetch, owned by one task that takes
/// the [`Turn`]s in the order they were asked.
struct Gate {
    concurrency: usize,
    book: Arc<Mutex<Book<Acker>>>,
    in_force: Arc<AtomicU16>,
    full: Arc<watch::Sender<bool>>,
    channel: Option<Channel>,
    /// What `channel` has in force.
    applied: u16,
    /// Fired when the channel cannot take a prefetch change: the session
    /// is over.
    broken: CancellationToken,
}

impl Gate {
    async fn run(mut self, mut turns: mpsc::UnboundedReceiver<Turn>) {
        while let Some(turn) = turns.recv().await {
            match turn {
                Turn::NextSession(done) => {
                    self.channel = None;
                    let mut book = lock(&self.book);
                    book.session += 1;
                    book.channel = None;
                    let _ = done.send(book.wanted(self.concurrency));
                }
                Turn::Attach {
                    channel,
                    applied,
                    broken,
                    done,
                } => {
                    lock(&self.book).channel = Some(channel.clone());
                    self.channel = Some(channel);
                    self.applied = applied;
                    self.broken = broken;
                    self.in_force.store(applied, Ordering::Relaxed);
                    self.apply().await;
                    let _ = done.send(());
                }
                Turn::Settle(done) => {
                    self.settle().await;
                    let _ = done.send(());
                }
            }
        }
    }

    /// The prefetch first, then the acks of every task that ended since
    /// the last turn (see the module doc for why in that order). Without a
    /// channel in line (between sessions, or a prefetch change that
    /// failed) nothing is acked: those messages went back, or go back,
    /// with their channel.
    async fn settle(&mut self) {
        let ended: Vec<Held<Acker>> = {
            let mut book = lock(&self.book);
            let ending = std::mem::take(&mut book.ending);
            let ended = ending
                .iter()
                .filter_map(|id| book.held.remove(id))
                .collect();
            tell_full(&book, self.concurrency, &self.full);
            ended
        };
        if !self.apply().await {
            let unacked = ended.iter().map(|h| h.ackers.len()).sum::<usize>();
            if unacked > 0 {
                tracing::debug!(
                    unacked,
                    "not acking: the consuming channel is gone; the messages go back to the broker"
                );
            }
            return;
        }
        for (acker, _) in ended.iter().flat_map(|h| &h.ackers) {
            ack(acker).await;
        }
    }

    /// Sets the prefetch the book asks for, if it differs from the one in
    /// force. Returns whether the channel is there and in line; a change
    /// refused or unanswered for [`QOS_TIMEOUT`] lets the channel go and
    /// ends the session (`broken`).
    async fn apply(&mut self) -> bool {
        let Some(channel) = self.channel.as_ref() else {
            return false;
        };
        let wanted = lock(&self.book).wanted(self.concurrency);
        if wanted == self.applied {
            return true;
        }
        match tokio::time::timeout(QOS_TIMEOUT, set_prefetch(channel, wanted)).await {
            Ok(Ok(())) => {
                tracing::trace!(prefetch = wanted, "prefetch changed");
                self.applied = wanted;
                self.in_force.store(wanted, Ordering::Relaxed);
                return true;
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "could not change prefetch; ending the session");
            }
            Err(_) => {
                tracing::warn!(
                    secs = QOS_TIMEOUT.as_secs(),
                    "the broker did not answer a prefetch change; reconnecting (the tasks that \
                     ended meanwhile are not acked: their redeliveries are answered from the \
                     record of ended tasks)"
                );
            }
        }
        self.channel = None;
        lock(&self.book).channel = None;
        self.broken.cancel();
        false
    }
}

/// A task id the book does not hold; the acker comes back to be acked by
/// the caller.
#[derive(Debug)]
pub struct NotHeld(pub Acker);

impl Prefetch {
    pub fn new(concurrency: usize) -> Self {
        let first = prefetch_of(i64::try_from(concurrency).unwrap_or(i64::MAX));
        Self {
            concurrency,
            book: Arc::new(Mutex::new(Book::default())),
            gate: OnceLock::new(),
            in_force: Arc::new(AtomicU16::new(first)),
            full: Arc::new(watch::Sender::new(concurrency == 0)),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book<Acker>> {
        lock(&self.book)
    }

    /// Tells the watchers of [`Prefetch::full`] what the book says now.
    fn tell(&self, book: &Book<Acker>) {
        tell_full(book, self.concurrency, &self.full);
    }

    /// Whether every slot is wanted (running, adopted, or waiting for one),
    /// watched: updated on every change of the book. A full node consumes
    /// nothing: the worker cancels its consumers while this is true.
    pub fn full(&self) -> watch::Receiver<bool> {
        self.full.subscribe()
    }

    /// Whether every slot is wanted now.
    pub fn is_full(&self) -> bool {
        self.book().full(self.concurrency)
    }

    /// Asks the gate for a turn and waits for it to be done; `None` only if
    /// the gate is gone (its runtime is shutting down).
    async fn turn<T>(&self, turn: impl FnOnce(oneshot::Sender<T>) -> Turn) -> Option<T> {
        let gate = self.gate.get_or_init(|| {
            let (turns, asked) = mpsc::unbounded_channel();
            let gate = Gate {
                concurrency: self.concurrency,
                book: self.book.clone(),
                in_force: self.in_force.clone(),
                full: self.full.clone(),
                channel: None,
                applied: self.in_force.load(Ordering::Relaxed),
                broken: CancellationToken::new(),
            };
            tokio::spawn(gate.run(asked));
            turns
        });
        let (done, answer) = oneshot::channel();
        gate.send(turn(done)).ok()?;
        answer.await.ok()
    }

    /// The prefetch last set on the channel.
    pub fn in_force(&self) -> u16 {
        self.in_force.load(Ordering::Relaxed)
    }

    /// Starts a new broker session: what was held came on the old channel.
    /// Returns the prefetch to open the new channel with.
    pub async fn next_session(&self) -> u16 {
        match self.turn(Turn::NextSession).await {
            Some(prefetch) => prefetch,
            None => self.book().wanted(self.concurrency),
        }
    }

    /// Hands over the new session's consuming channel, opened with
    /// `applied`, and brings its prefetch up to date (tasks may have ended
    /// while it opened). `broken` fires when the channel refuses a
    /// prefetch change or does not answer one: the session must end.
    pub async fn attach(&self, channel: Channel, applied: u16, broken: CancellationToken) {
        self.turn(|done| Turn::Attach {
            channel,
            applied,
            broken,
            done,
        })
        .await;
    }

    /// Holds a new task's message, delivered on the current session.
    /// `wants_slot`: it runs as soon as a slot is free (false: it waits for
    /// its `eta` first). A held message that wants no slot gives the node
    /// room: [`Prefetch::settle`] afterwards. Returns the session it is
    /// held in.
    pub fn hold(&self, id: &str, acker: Acker, wants_slot: bool) -> u64 {
        let mut book = self.book();
        let session = book.session;
        book.held.insert(
            id.to_owned(),
            Held {
                wants_slot,
                ackers: vec![(acker, session)],
            },
        );
        self.tell(&book);
        session
    }

    /// Holds a slot for task `id`, adopted at start from an earlier run of
    /// this node, before its message is here: the broker gave that message
    /// back when the earlier run went. When it comes to this node,
    /// [`Prefetch::hold_again`] holds it; [`Prefetch::end`] acks what came.
    /// Entered before the first session, so its prefetch counts the slot.
    pub fn adopt(&self, id: &str) {
        let mut book = self.book();
        book.held.insert(
            id.to_owned(),
            Held {
                wants_slot: true,
                ackers: Vec::new(),
            },
        );
        self.tell(&book);
    }

    /// Takes back the message of task `id` held in `session`, if that is
    /// still the current session and its channel is open (else its message
    /// is back with the broker, or on its way: lapin wakes every consumer
    /// with a dead connection's error before the session loop sees it): to
    /// hold it again as a task that runs here. A message refused is let go.
    pub fn take(&self, id: &str, session: u64) -> Option<Acker> {
        let mut book = self.book();
        if book.session != session {
            return None;
        }
        let open = (book.channel.as_ref()).is_some_and(|channel| channel.status().connected());
        let held = book.held.get_mut(id)?;
        let at = held.ackers.iter().position(|(_, s)| *s == session)?;
        let (acker, _) = held.ackers.remove(at);
        if held.ackers.is_empty() {
            book.held.remove(id);
        }
        self.tell(&book);
        if !open || !acker.usable() {
            tracing::debug!(
                channel_open = open,
                "not taking back a held message: its channel is closed, the broker has it again"
            );
            return None;
        }
        Some(acker)
    }

    /// Lets go of task `id`'s messages held in `session` or before
    /// without an ack (they went back to the broker with their channel); a
    /// message held again since, in a later session, stays.
    pub fn forget_session(&self, id: &str, session: u64) {
        let mut book = self.book();
        if let Some(held) = book.held.get_mut(id) {
            held.ackers.retain(|(_, s)| *s > session);
            if held.ackers.is_empty() {
                book.held.remove(id);
            }
        }
        self.tell(&book);
    }

    /// Holds a redelivery of task `id` until it ends;
    /// [`Prefetch::settle`] afterwards.
    pub fn hold_again(&self, id: &str, acker: Acker) -> Result<(), NotHeld> {
        let mut book = self.book();
        let session = book.session;
        match book.held.get_mut(id) {
            Some(held) => {
                held.ackers.push((acker, session));
                Ok(())
            }
            None => Err(NotHeld(acker)),
        }
    }

    /// An `eta` task's time came: it wants a slot now.
    pub async fn want_slot(&self, id: &str) {
        self.set_wants_slot(id, true);
        self.settle().await;
    }

    /// Task `id` no longer holds nor waits for a slot; call it once the
    /// slot is free (the permit dropped), then [`Prefetch::settle`] so the
    /// broker may fill it.
    pub fn slot_freed(&self, id: &str) {
        self.set_wants_slot(id, false);
    }

    fn set_wants_slot(&self, id: &str, wants: bool) {
        let mut book = self.book();
        if let Some(held) = book.held.get_mut(id) {
            held.wants_slot = wants;
        }
        self.tell(&book);
    }

    /// Brings the channel's prefetch in line with what is held, and acks
    /// the messages of every task that ended since the gate's last turn:
    /// the prefetch first, then the acks (see the module doc for why in
    /// that order). Changes made meanwhile coalesce: a slot freed and a
    /// task ended cancel out, and no frame but the acks is sent.
    pub async fn settle(&self) {
        self.turn(Turn::Settle).await;
    }

    /// Task `id` is over: its messages are acked (see
    /// [`Prefetch::settle`]). Returns once they are, in this call's turn or
    /// in one before it.
    pub async fn end(&self, id: &str) {
        self.book().ending.push(id.to_owned());
        self.settle().await;
    }

    /// Lets task `id` go and hands back the ackers of its messages held
    /// in the current session, for the caller to requeue at once (another
    /// node took the task over); those of older sessions went back with
    /// their channel.
    pub fn give_back(&self, id: &str) -> Vec<Acker> {
        let mut book = self.book();
        let session = book.session;
        let Some(held) = book.held.remove(id) else {
            return Vec::new();
        };
        (held.ackers.into_iter())
            .filter(|(_, s)| *s == session)
            .map(|(acker, _)| acker)
            .collect()
    }

    /// Lets task `id` go without an ack: its message goes back to the
    /// queue when the channel closes (shutdown), or went back with its
    /// session.
    pub fn forget(&self, id: &str) {
        let mut book = self.book();
        book.held.remove(id);
        self.tell(&book);
    }
}

/// Acks one message; a failed ack (its channel is gone) means the broker
/// redelivers it, and the record of ended tasks answers that.
pub async fn ack(acker: &Acker) {
    if let Err(error) = acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(%error, "ack failed; the message will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(wants_slot: bool, sessions: &[u64]) -> Held<()> {
        Held {
            wants_slot,
            ackers: sessions.iter().map(|s| ((), *s)).collect(),
        }
    }

    fn book(session: u64, held: Vec<(&str, Held<()>)>) -> Book<()> {
        Book {
            session,
            held: held.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ending: Vec::new(),
            channel: None,
        }
    }

    #[test]
    fn running_tasks_leave_one_message_per_free_slot() {
        assert_eq!(book(1, vec![]).wanted(2), 2);
        // One running: unacked 1, prefetch 2, room for one more.
        assert_eq!(book(1, vec![("a", held(true, &[1]))]).wanted(2), 2);
        let full = book(1, vec![("a", held(true, &[1])), ("b", held(true, &[1]))]);
        assert_eq!(full.wanted(2), 2);
    }

    #[test]
    fn an_ending_task_or_an_eta_hold_makes_room_for_one_more() {
        // a's slot is free, its ack waits for the confirm: 2 unacked, 3
        // allowed, so b's neighbour slot can be refilled.
        let ending = book(1, vec![("a", held(false, &[1])), ("b", held(true, &[1]))]);
        assert_eq!(ending.wanted(2), 3);
        let eta = book(1, vec![("e", held(false, &[1]))]);
        assert_eq!(eta.wanted(1), 2);
    }

    #[test]
    fn a_redelivery_of_a_running_task_holds_no_slot() {
        let twice = book(1, vec![("a", held(true, &[1, 1]))]);
        assert_eq!(twice.wanted(2), 3);
    }

    #[test]
    fn after_a_reconnect_only_free_slots_are_asked_for() {
        // Both running tasks' messages were on the old channel.
        let orphans = book(2, vec![("a", held(true, &[1])), ("b", held(true, &[1]))]);
        assert_eq!(orphans.wanted(3), 1);
        // a's message came back on the new channel: held for that run.
        let back = book(2, vec![("a", held(true, &[1, 2])), ("b", held(true, &[1]))]);
        assert_eq!(back.wanted(3), 2);
    }

    #[test]
    fn an_adopted_task_holds_a_slot_before_its_message_comes() {
        // Adopted, no message yet: one slot of two taken.
        let adopted = book(1, vec![("a", held(true, &[]))]);
        assert_eq!(adopted.wanted(2), 1);
        // More adopted than slots (CONCURRENCY lowered across the
        // restart): still 1, never 0 (no limit).
        let over = book(1, vec![("a", held(true, &[])), ("b", held(true, &[]))]);
        assert_eq!(over.wanted(1), 1);
        // Its message came back here: held for that run.
        let back = book(1, vec![("a", held(true, &[1]))]);
        assert_eq!(back.wanted(2), 2);
    }

    #[test]
    fn the_prefetch_is_never_zero_which_would_mean_no_limit() {
        let orphans = book(2, vec![("a", held(true, &[1])), ("b", held(true, &[1]))]);
        assert_eq!(orphans.wanted(2), 1);
        assert_eq!(prefetch_of(-5), 1);
        assert_eq!(prefetch_of(1 << 40), u16::MAX);
    }

    #[test]
    fn a_node_is_full_when_every_slot_is_wanted() {
        assert!(!book(1, vec![]).full(1));
        // Running, or waiting for a slot: both want one.
        let one = book(1, vec![("a", held(true, &[1]))]);
        assert!(one.full(1));
        assert!(!one.full(2));
        // A held message that wants no slot (an eta, a redelivery asked
        // about, a task ending) leaves the slot free.
        let eta = book(1, vec![("a", held(true, &[1])), ("e", held(false, &[1]))]);
        assert!(!eta.full(2));
        // Adopted, its message not here: it holds its slot.
        let adopted = book(1, vec![("a", held(true, &[])), ("b", held(true, &[1]))]);
        assert!(adopted.full(2));
        // After a reconnect with every slot busy: full, whatever the
        // prefetch floor says.
        let orphans = book(2, vec![("a", held(true, &[1])), ("b", held(true, &[1]))]);
        assert!(orphans.full(2));
        assert_eq!(orphans.wanted(2), 1);
        // More adopted than slots.
        let over = book(1, vec![("a", held(true, &[])), ("b", held(true, &[]))]);
        assert!(over.full(1));
    }

    #[test]
    fn the_full_watch_changes_only_when_fullness_does() {
        let (full, mut seen) = watch::channel(false);
        let mut b = book(1, vec![("a", held(true, &[1]))]);
        tell_full(&b, 2, &full);
        assert!(!seen.has_changed().unwrap());
        b.held.insert("b".into(), held(true, &[1]));
        tell_full(&b, 2, &full);
        assert!(seen.has_changed().unwrap());
        assert!(*seen.borrow_and_update());
        tell_full(&b, 2, &full);
        assert!(!seen.has_changed().unwrap());
        b.held.get_mut("a").unwrap().wants_slot = false;
        tell_full(&b, 2, &full);
        assert!(!*seen.borrow_and_update());
    }
}
