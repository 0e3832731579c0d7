//! The offliners this worker knows: task name → kind of scraper.
//!
//! Owns the task table of SPEC §3 (which task names are registered). It must
//! not call Docker or decode messages.

use std::fmt;

/// One registered task (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offliner {
    Mwoffliner,
    Youtube,
    Gutenberg,
    Phet,
}

impl Offliner {
    pub const ALL: [Offliner; 4] = [
        Offliner::Mwoffliner,
        Offliner::Youtube,
        Offliner::Gutenberg,
        Offliner::Phet,
    ];

    /// The Celery task name, as the dispatcher sends it.
    pub fn task_name(self) -> &'static str {
        match self {
            Offliner::Mwoffliner => "offliner.mwoffliner",
            Offliner::Youtube => "offliner.youtube",
            Offliner::Gutenberg => "offliner.gutenberg",
            Offliner::Phet => "offliner.phet",
        }
    }

    /// The offliner for a task name, or `None` for a task not registered here.
    pub fn from_task_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.task_name() == name)
    }
}

impl fmt::Display for Offliner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.task_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip() {
        for o in Offliner::ALL {
            assert_eq!(Offliner::from_task_name(o.task_name()), Some(o));
        }
        assert_eq!(Offliner::from_task_name("offliner.unknown"), None);
        assert_eq!(Offliner::from_task_name("celery.ping"), None);
    }
}
