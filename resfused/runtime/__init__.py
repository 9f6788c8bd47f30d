"""State kept while fused modules run: packed weight copies, the kernel trace, the NaN/Inf check, the buffer cache."""
