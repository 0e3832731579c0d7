//! What a decoded task message becomes, decided apart from acting on it: a
//! pure function of the message, of what the worker knows about its id
//! when it arrives, and of the time, so that every case is one line of a
//! table test. [`super::delivery`] gathers what is known (under the
//! registry's lock) and carries the decision out.
//!
//! Owns the order of the checks only; it touches nothing.

use chrono::{DateTime, TimeDelta, Utc};

use super::registry::TaskPhase;
use crate::broker::CONSUMER_TIMEOUT_MS;
use crate::celery::{EventKind, TaskRequest};
use crate::offliner;

/// Furthest `eta` accepted: the delivery timeout the worker asks of the
/// broker for its consumers (14 days). A message held unacked longer is
/// taken back by the broker, so the worker could never hold it until its
/// time; further etas are refused like invalid messages.
pub(super) const MAX_ETA_AHEAD: TimeDelta = TimeDelta::milliseconds(CONSUMER_TIMEOUT_MS);

/// What the worker knows about a task id when its message arrives, and
/// about the message itself.
#[derive(Debug, Clone, Default)]
pub(super) struct Known {
    /// The task is in the registry here, in this phase.
    pub here: Option<TaskPhase>,
    /// The task ended here: its final event, from the record of ended tasks.
    pub ended: Option<EventKind>,
    /// Its id is among the revoked ids remembered.
    pub revoked: bool,
    /// A live session through which the farm can be asked about a
    /// redelivery (none when the farm has just answered "run it here").
    pub can_ask_farm: bool,
    /// Fewer than MAX_ETA_HELD tasks are held for their `eta`: one more may
    /// be.
    pub eta_room: bool,
    /// The message is larger than MAX_MESSAGE_BYTES: its body was never
    /// read, the request is what its headers say (see [`Admission::TooLarge`]).
    pub too_large: bool,
    /// A slot is free for a task that runs now (the node stops consuming
    /// when none is, but a delivery may cross that cancel).
    pub slot_free: bool,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Admission {
    /// Larger than MAX_MESSAGE_BYTES, and neither here nor ended here nor
    /// held for the farm: not run (`task-failed`, acked).
    TooLarge,
    /// No offliner has this task name: it runs nowhere here (rejected,
    /// with Celery's `NotRegistered`). Decided only once this node knows
    /// the task is not running elsewhere: in a farm of mixed versions a
    /// newer node may run a task an older one does not know.
    Unregistered,
    /// A run of it is here: its message is held until that run ends.
    AlreadyHere(TaskPhase),
    /// It ended here: its final event is sent again, then the message acked.
    EndedHere(EventKind),
    /// A redelivery of a task neither here nor ended here, maybe running on
    /// another node: the farm is asked first.
    AskFarm,
    /// Not run: its `expires` passed before it could start.
    Expired,
    /// Not run: it was revoked before it arrived.
    Revoked,
    /// Not run: its `eta` is further ahead than [`MAX_ETA_AHEAD`]
    /// (`task-failed`, acked).
    EtaTooFar,
    /// Its `eta` is ahead but MAX_ETA_HELD tasks are held for theirs: the
    /// message goes back to the tail of its queue, as it came.
    Requeue,
    /// Taken: run as soon as a slot is free, or held until its `eta`.
    Accept { at_eta: bool },
    /// It would run now, but every slot is busy: the message goes back to
    /// the broker at once (`basic.reject`, requeued) for a node with a free
    /// slot.
    NoSlot,
}

/// Decides what becomes of `request` (delivered again when `redelivered`),
/// from what is `known` about it at `now`. The checks go in this order:
/// here, ended here, a redelivery to ask the farm about, too large,
/// registered, expired, revoked, an `eta` too far, no room for one more
/// `eta`, then accepted: held for its `eta`, or run now if a slot is free
/// (else given back). What the message's id says of a run in the farm
/// comes first: a message this node cannot take (too large, a task it does
/// not know) is failed only when no run of its task is here or elsewhere.
pub(super) fn admit(
    request: &TaskRequest,
    redelivered: bool,
    known: Known,
    now: DateTime<Utc>,
) -> Admission {
    if let Some(phase) = known.here {
        return Admission::AlreadyHere(phase);
    }
    if let Some(event) = known.ended {
        return Admission::EndedHere(event);
    }
    if redelivered && known.can_ask_farm {
        return Admission::AskFarm;
    }
    if known.too_large {
        return Admission::TooLarge;
    }
    if !offliner::is_registered(&request.name) {
        return Admission::Unregistered;
    }
    if request.expires.is_some_and(|expires| expires <= now) {
        return Admission::Expired;
    }
    if known.revoked {
        return Admission::Revoked;
    }
    match request.eta {
        Some(eta) if eta - now > MAX_ETA_AHEAD => Admission::EtaTooFar,
        Some(eta) if eta > now && !known.eta_room => Admission::Requeue,
        Some(eta) if eta > now => Admission::Accept { at_eta: true },
        _ if !known.slot_free => Admission::NoSlot,
        _ => Admission::Accept { at_eta: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn request(name: &str, eta: Option<i64>, expires: Option<i64>) -> TaskRequest {
        let at = |s: i64| Utc.timestamp_opt(s, 0).single().expect("a time");
        let mut request = crate::celery::request_from_json(&format!(
            r#"{{"task": "{name}", "id": "6f1c9a0b2d3e4f5a6b7c8d9e"}}"#
        ))
        .expect("a request");
        request.eta = eta.map(at);
        request.expires = expires.map(at);
        request
    }

    fn ended() -> EventKind {
        EventKind::TaskRevoked {
            uuid: "6f1c9a0b2d3e4f5a6b7c8d9e".into(),
            terminated: false,
            signum: None,
            expired: false,
        }
    }

    #[test]
    fn each_case_in_its_order() {
        const NOW: i64 = 1_000;
        let now = Utc.timestamp_opt(NOW, 0).single().unwrap();
        let mwoffliner = "offliner.mwoffliner";
        let nothing = Known {
            eta_room: true,
            slot_free: true,
            ..Known::default()
        };
        let full = Known {
            slot_free: true,
            ..Known::default()
        };
        let no_slot = Known {
            eta_room: true,
            ..Known::default()
        };
        let farm = Known {
            can_ask_farm: true,
            eta_room: true,
            slot_free: true,
            ..Known::default()
        };
        let here = Known {
            here: Some(TaskPhase::Active),
            ended: Some(ended()),
            revoked: true,
            can_ask_farm: true,
            eta_room: true,
            too_large: true,
            slot_free: false,
        };
        let ended_here = Known {
            ended: Some(ended()),
            revoked: true,
            can_ask_farm: true,
            ..Known::default()
        };
        let revoked = Known {
            revoked: true,
            eta_room: true,
            ..Known::default()
        };
        let large = Known {
            too_large: true,
            ..nothing.clone()
        };
        let large_farm = Known {
            too_large: true,
            ..farm.clone()
        };
        let large_ended = Known {
            too_large: true,
            ..ended_here.clone()
        };
        let unknown = "offliner.newer";
        let ended_no_slot = Known {
            ended: Some(ended()),
            ..Known::default()
        };
        let ahead = MAX_ETA_AHEAD.num_seconds();
        #[rustfmt::skip]
        let table: Vec<(&str, TaskRequest, bool, Known, Admission)> = vec![
            ("a run here comes before its record",
                request(mwoffliner, None, None), true, here.clone(), Admission::AlreadyHere(TaskPhase::Active)),
            ("a run here of a task unknown here is held",
                request(unknown, None, None), true, here.clone(), Admission::AlreadyHere(TaskPhase::Active)),
            ("ended here comes before the farm and revoked",
                request(mwoffliner, None, Some(NOW - 1)), true, ended_here.clone(), Admission::EndedHere(ended())),
            ("ended here, a task unknown here",
                request(unknown, None, None), false, ended_here, Admission::EndedHere(ended())),
            ("an older node asks the farm about a redelivery of a task it does not know",
                request(unknown, None, None), true, farm.clone(), Admission::AskFarm),
            ("a task unknown here, the farm answered: not registered",
                request(unknown, None, None), true, nothing.clone(), Admission::Unregistered),
            ("a first delivery of a task unknown here: not registered",
                request(unknown, None, None), false, farm.clone(), Admission::Unregistered),
            ("not registered comes before expired and revoked",
                request(unknown, None, Some(NOW - 1)), false, revoked.clone(), Admission::Unregistered),
            ("too large: a run here holds it",
                request(mwoffliner, None, None), true, here.clone(), Admission::AlreadyHere(TaskPhase::Active)),
            ("too large: ended here sends its final event again",
                request(mwoffliner, None, None), true, large_ended, Admission::EndedHere(ended())),
            ("too large: a redelivery asks the farm",
                request(mwoffliner, None, None), true, large_farm.clone(), Admission::AskFarm),
            ("too large: a first delivery fails",
                request(mwoffliner, None, None), false, large_farm, Admission::TooLarge),
            ("too large: the farm answered, it fails",
                request(mwoffliner, None, None), true, large.clone(), Admission::TooLarge),
            ("too large comes before not registered, expired and an eta",
                request(unknown, Some(NOW + 60), Some(NOW - 1)), false, large, Admission::TooLarge),
            ("a redelivery with a session asks the farm, even expired",
                request(mwoffliner, None, Some(NOW - 1)), true, farm.clone(), Admission::AskFarm),
            ("a first delivery does not ask the farm",
                request(mwoffliner, None, None), false, farm.clone(), Admission::Accept { at_eta: false }),
            ("a redelivery the farm answered runs here",
                request(mwoffliner, None, None), true, nothing.clone(), Admission::Accept { at_eta: false }),
            ("expired at its expiry",
                request(mwoffliner, None, Some(NOW)), false, nothing.clone(), Admission::Expired),
            ("expired comes before revoked",
                request(mwoffliner, None, Some(NOW - 1)), false, revoked.clone(), Admission::Expired),
            ("revoked before it arrived",
                request(mwoffliner, None, Some(NOW + 1)), false, revoked.clone(), Admission::Revoked),
            ("an eta ahead is held for it",
                request(mwoffliner, Some(NOW + 60), None), false, nothing.clone(), Admission::Accept { at_eta: true }),
            ("an eta as far as allowed is held",
                request(mwoffliner, Some(NOW + ahead), None), false, nothing.clone(), Admission::Accept { at_eta: true }),
            ("an eta further is refused",
                request(mwoffliner, Some(NOW + ahead + 1), None), false, nothing.clone(), Admission::EtaTooFar),
            ("an eta further is refused, held full or not",
                request(mwoffliner, Some(NOW + ahead + 1), None), false, full.clone(), Admission::EtaTooFar),
            ("revoked comes before an eta too far",
                request(mwoffliner, Some(NOW + ahead + 1), None), false, revoked, Admission::Revoked),
            ("an eta ahead with no room goes back to its queue",
                request(mwoffliner, Some(NOW + 60), None), false, full.clone(), Admission::Requeue),
            ("an eta passed runs now, held full or not",
                request(mwoffliner, Some(NOW), None), false, full, Admission::Accept { at_eta: false }),
            ("an eta passed runs now",
                request(mwoffliner, Some(NOW), None), false, nothing.clone(), Admission::Accept { at_eta: false }),
            ("no free slot: a task that would run now goes back",
                request(mwoffliner, None, None), false, no_slot.clone(), Admission::NoSlot),
            ("no free slot: an eta passed goes back too",
                request(mwoffliner, Some(NOW), None), false, no_slot.clone(), Admission::NoSlot),
            ("no free slot: a redelivery the farm said to run here goes back",
                request(mwoffliner, None, None), true, no_slot.clone(), Admission::NoSlot),
            ("no free slot: an eta ahead is still held for it",
                request(mwoffliner, Some(NOW + 60), None), false, no_slot.clone(), Admission::Accept { at_eta: true }),
            ("no free slot: a redelivery still asks the farm",
                request(mwoffliner, None, None), true, Known { can_ask_farm: true, ..no_slot.clone() }, Admission::AskFarm),
            ("no free slot: expired is still reported",
                request(mwoffliner, None, Some(NOW)), false, no_slot.clone(), Admission::Expired),
            ("no free slot: ended here still answers",
                request(mwoffliner, None, None), true, ended_no_slot, Admission::EndedHere(ended())),
            ("no free slot: a run here still holds its redelivery",
                request(mwoffliner, None, None), true, here.clone(), Admission::AlreadyHere(TaskPhase::Active)),
        ];
        for (case, request, redelivered, known, expected) in table {
            assert_eq!(admit(&request, redelivered, known, now), expected, "{case}");
        }
    }
}
