//! Reading the DLQ without committing, and the replay progress group.
