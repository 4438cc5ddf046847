//! Byte transports to a KD target.
