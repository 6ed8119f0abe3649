"""What the benchmark scripts share: data loading, the small model zoo, CLI flags, the text corpus."""
