//! TODO(helper): kddebugger_data
