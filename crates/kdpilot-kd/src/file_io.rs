//! TODO(helper): file_io
