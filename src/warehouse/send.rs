//! Sending one file's missing ranges: how many streams it gets and the
//! size of its writes, then the loop that runs the streams and the reader,
//! records each confirmed range in the journal as its status comes in,
//! follows streams going down, reconnecting or refused, and ends with the
//! reader's ZIM verdict once every byte is confirmed.
//!
//! Owns that loop and the closing of the extra streams beside the publish.
//! It must not open or rename the `.tmp`, nor decide what is missing (the
//! upload hands it the ranges); the streams themselves are `streams`'.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::progress::Progress;
use super::resume::Record;
use super::session::Connection;
use super::streams::{Event, Extras, ReadEnd, Shared, Start, StreamEnd, run_stream, spawn_reader};
use super::syncer::{SYNC_EVERY, Syncer};
use super::zim::ZimError;
use super::{UploadItem, UploadReport, Warehouse, WarehouseError};
use crate::config::{MAX_UPLOAD_STREAMS, UploadStreams};

/// The link `auto` sizes the streams for: 1 Gbit/s. On a slower link the
/// spare streams cost a handshake each and little else.
const AUTO_LINK_BYTES_PER_SEC: f64 = 125e6;
/// What one session channel to OpenSSH's server carries per round trip:
/// its window is `CHAN_SES_WINDOW_DEFAULT`, 2 MiB, not configurable, and
/// refilled once half of it is used (measured here: about 1.6 MiB).
const CHANNEL_WINDOW: u64 = 3 << 19;
/// Below this much to send per stream, another stream costs more than it
/// brings.
const MIN_BYTES_PER_STREAM: u64 = 8 << 20;
/// The smallest write (OpenSSH's `sftp` writes 32 KiB).
const MIN_PIECE: usize = 32 << 10;

/// How many streams one file goes over: `setting`, or for `auto` enough
/// to carry [`AUTO_LINK_BYTES_PER_SEC`] at [`CHANNEL_WINDOW`] per round
/// trip (one when one is enough, one spare otherwise); never more than
/// one per [`MIN_BYTES_PER_STREAM`] still to send.
pub(super) fn streams_for(setting: UploadStreams, rtt: Duration, to_send: u64) -> usize {
    let wanted = match setting {
        UploadStreams::Fixed(n) => usize::from(n),
        UploadStreams::Auto => {
            let per_round_trip = AUTO_LINK_BYTES_PER_SEC * rtt.as_secs_f64();
            let needed = (per_round_trip / CHANNEL_WINDOW as f64).ceil() as usize;
            if needed <= 1 { 1 } else { needed + 1 }
        }
    };
    let by_size = usize::try_from(to_send / MIN_BYTES_PER_STREAM).unwrap_or(usize::MAX);
    wanted
        .min(by_size)
        .clamp(1, usize::from(MAX_UPLOAD_STREAMS))
}

/// The bytes of one write: the largest the server takes for a large file,
/// down to [`MIN_PIECE`] for a small one, so that a slow link cut in the
/// middle of a small file still has something confirmed to resume from.
fn piece_len(size: u64, write_len: usize) -> usize {
    let sixty_fourth = usize::try_from(size / 64).unwrap_or(usize::MAX) & !4095;
    sixty_fourth.clamp(MIN_PIECE.min(write_len), write_len)
}

/// Sends the missing ranges of `source` (the item's file, opened once)
/// over `streams` streams, the first on `conn` with `handle`; once every
/// range is confirmed, returns the reader's ZIM verdict, `handle`, still
/// open, unless the first stream lost it, and the other streams, closing
/// their handles.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    warehouse: &Warehouse,
    conn: &Connection,
    extras: &mut Extras,
    item: &UploadItem,
    source: &Arc<File>,
    tmp_path: &str,
    handle: String,
    (size, missing, zim, streams): (u64, Vec<std::ops::Range<u64>>, bool, usize),
    record: &mut Record,
    progress: &mut Progress,
    report: &mut UploadReport,
) -> Result<(Option<Result<(), ZimError>>, Option<String>, Closing), WarehouseError> {
    let local_failed = |detail: String| WarehouseError::Local {
        path: item.local.clone(),
        detail,
    };
    let (fresh, mut read_end) = spawn_reader(
        source.clone(),
        missing,
        piece_len(size, conn.sftp().write_len()),
        zim,
    );
    let (again_tx, again_rx) = async_channel::unbounded();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    // Dropped with this future: a failed or cancelled upload stops its
    // streams, and the reader with them.
    let _stop_guard = stop.clone().drop_guard();
    let shared = Shared {
        warehouse: warehouse.clone(),
        local: source.clone(),
        path: tmp_path.to_owned(),
        fresh,
        again_tx,
        again_rx,
        events: events_tx,
        stop: stop.clone(),
    };
    // Stream 0 apart: it keeps its handle for the publish, while the
    // others close theirs meanwhile. Both sets stop their tasks when
    // dropped, as a failed upload drops them.
    let mut main = tokio::task::JoinSet::new();
    main.spawn(run_stream(
        0,
        shared.clone(),
        Start::Main(conn.sftp().clone(), handle),
    ));
    // Large files are synced as they arrive; dropped with this future.
    let syncer = (size.saturating_sub(record.journal.confirmed.covered()) >= 2 * SYNC_EVERY
        && conn.sftp().can_sync())
    .then(|| Syncer::start(conn.side_session(), tmp_path.to_owned()));
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 1..streams {
        tasks.spawn(run_stream(stream, shared.clone(), extras.start()));
    }
    drop(shared);
    if streams > 1 {
        tracing::info!(file = %item.name, streams, rtt_ms = conn.rtt().as_millis() as u64, "uploading over several connections");
    }
    let mut up = vec![false; streams];
    up[0] = true;
    let mut starting = streams - 1;
    let mut refused = 0usize;
    let mut alive = streams;
    let mut verdict = None;
    progress.set_streams(1);
    while verdict.is_none() || record.journal.confirmed.covered() < size {
        tokio::select! {
            end = &mut read_end, if verdict.is_none() => match end {
                Ok(ReadEnd::Done { size: read, zim }) => {
                    if read != size {
                        return Err(local_failed(format!(
                            "it changed size while being uploaded ({size} → {read} bytes)"
                        )));
                    }
                    verdict = Some(zim);
                }
                Ok(ReadEnd::Failed(detail)) => return Err(local_failed(detail)),
                Err(_) => return Err(local_failed("the reader stopped early".to_owned())),
            },
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(local_failed("the upload streams stopped early".to_owned()));
                };
                match event {
                    Event::Confirmed { offset, len } => {
                        record.confirmed(offset..offset + len).await;
                        if let Some(syncer) = &syncer {
                            syncer.confirmed(record.journal.confirmed.covered());
                        }
                        report.bytes_sent += len;
                        progress.add(&item.name, len);
                    }
                    Event::Up { stream, reconnect } => {
                        up[stream] = true;
                        if reconnect {
                            tracing::info!(file = %item.name, stream, "upload stream reconnected");
                        } else {
                            starting -= 1;
                            if starting == 0 && refused > 0 {
                                warn_refused(&item.name, streams, refused);
                            }
                        }
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                    }
                    Event::Down { stream, error, retry_in } => {
                        up[stream] = false;
                        crate::metrics::global().upload_stream_retry();
                        tracing::warn!(file = %item.name, stream, %error, ?retry_in, "upload stream failed; the others go on, it reconnects");
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                    }
                    Event::Refused { stream } => {
                        tracing::debug!(file = %item.name, stream, "no extra connection for this stream");
                        refused += 1;
                        starting -= 1;
                        alive -= 1;
                        if starting == 0 {
                            warn_refused(&item.name, streams, refused);
                        }
                    }
                    Event::Unreadable(detail) => return Err(local_failed(detail)),
                    Event::Gone { stream, error } => {
                        up[stream] = false;
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                        alive -= 1;
                        if alive == 0 {
                            return Err(WarehouseError::GaveUp {
                                attempts: warehouse.settings.upload_retries + 1,
                                last: Box::new(error),
                            });
                        }
                        tracing::warn!(file = %item.name, stream, %error, "upload stream gave up; the others go on");
                    }
                }
            }
        }
    }
    stop.cancel();
    report.synced_early = syncer.map_or(0, |s| s.synced());
    let kept = match main.join_next().await {
        Some(Ok(end)) => {
            end.closed?;
            end.kept
        }
        Some(Err(e)) => return Err(local_failed(format!("an upload stream failed: {e}"))),
        None => None,
    };
    progress.set_streams(0);
    Ok((
        verdict.expect("the loop ends with a verdict"),
        kept,
        Closing(tasks),
    ))
}

/// The other streams of a file whose every write is confirmed, closing
/// their handles: that takes a round trip, which goes beside the publish.
pub(super) struct Closing(tokio::task::JoinSet<StreamEnd>);

impl Closing {
    /// Waits for them and keeps their connections for the next file. A
    /// handle that does not close loses nothing (its writes were all
    /// confirmed); its connection is not used again.
    pub(super) async fn finish(mut self, extras: &mut Extras, name: &str) {
        while let Some(joined) = self.0.join_next().await {
            match joined {
                Ok(StreamEnd { closed, conn, .. }) => match closed {
                    Ok(()) => {
                        if let Some(conn) = conn {
                            extras.give_back(conn);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(file = name, %error, "an upload stream could not close its handle");
                    }
                },
                Err(e) => tracing::warn!(file = name, error = %e, "an upload stream failed"),
            }
        }
    }
}

fn warn_refused(name: &str, streams: usize, refused: usize) {
    tracing::warn!(
        file = name,
        "the warehouse took {} of {streams} connections; uploading over {}",
        streams - refused,
        streams - refused
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_streams_cover_what_a_channel_carries_per_round_trip_of_a_gigabit_link() {
        let ms = Duration::from_millis;
        let gib = 1 << 30;
        let auto = |rtt, size| streams_for(UploadStreams::Auto, rtt, size);
        // Loopback and a near warehouse: one is enough.
        assert_eq!(auto(ms(0), gib), 1);
        assert_eq!(auto(ms(10), gib), 1);
        // 50 ms: 6.25 MB per round trip is 4 channels of 1.5 MiB, plus a
        // spare.
        assert_eq!(auto(ms(50), gib), 5);
        // 150 ms: 18.75 MB is 12 channels, plus a spare.
        assert_eq!(auto(ms(150), gib), 13);
        // Far away and very far away: never more than 16.
        assert_eq!(auto(ms(400), gib), 16);
        // A small file gets one stream per 8 MiB to send, at least one.
        assert_eq!(auto(ms(150), 20 << 20), 2);
        assert_eq!(auto(ms(150), 1000), 1);
        assert_eq!(auto(ms(150), 0), 1);
    }

    #[test]
    fn small_files_go_in_smaller_writes() {
        let w = 255 << 10;
        assert_eq!(piece_len(0, w), 32 << 10);
        assert_eq!(piece_len(36_000, w), 32 << 10);
        assert_eq!(piece_len(4 << 20, w), 64 << 10);
        assert_eq!(piece_len(1 << 30, w), w);
        // A server that takes less gets no more than it takes.
        assert_eq!(piece_len(1 << 30, 16 << 10), 16 << 10);
        assert_eq!(piece_len(0, 16 << 10), 16 << 10);
    }

    #[test]
    fn fixed_streams_are_kept_but_not_for_small_files() {
        let rtt = Duration::from_millis(1);
        assert_eq!(streams_for(UploadStreams::Fixed(8), rtt, 1 << 30), 8);
        assert_eq!(streams_for(UploadStreams::Fixed(16), rtt, 1 << 30), 16);
        assert_eq!(streams_for(UploadStreams::Fixed(8), rtt, 24 << 20), 3);
        assert_eq!(streams_for(UploadStreams::Fixed(1), rtt, 1 << 30), 1);
    }
}
