"""Versioned mini bench files (JSONL); a package so wheels ship them."""
