//! (no library code: see e2e/)
