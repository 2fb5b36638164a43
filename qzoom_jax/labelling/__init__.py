"""Label runs: stage-1 teacher pseudo-labels and stage-3 multi-budget answers, in resumable parts."""
