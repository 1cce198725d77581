//! The engine under watch, audit and verify: the live table of sockets
//! (`table`), kept from what an `EventSource` reports (`source`), with every
//! loss accounted for (`ledger`) and the kernel's stamps in wall-clock time
//! (`clock`), run by the `monitor`, which hands what it sees to the mode's
//! observer.

pub mod clock;
pub mod images;
pub mod ledger;
pub mod monitor;
pub mod source;
pub mod table;
