"""Importance estimation: activation-based width scores, normalized-MSE depth scores, and the
function-preserving sort that makes every nested budget a contiguous prefix."""
