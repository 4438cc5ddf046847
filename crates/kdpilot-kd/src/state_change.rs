//! TODO(helper): state_change
