"""Models: loading, the tiny builder, the memory bank, the Memory Head and generation with recall."""
