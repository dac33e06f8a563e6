//! Connection dispatch: the per-worker channel ([`channel`]) and the policies that pick a
//! worker for each accepted connection ([`policy`]).

pub mod channel;
pub mod policy;
pub(crate) mod sys;

pub use channel::{Channel, Reports, SendError};
pub use policy::{Candidate, Policy};
