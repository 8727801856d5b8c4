"""Everything that speaks Megatron-LM: flags, parsed args, the --spec seam, the launcher, compat."""
