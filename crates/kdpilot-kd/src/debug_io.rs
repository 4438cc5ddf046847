//! TODO(helper): debug_io
