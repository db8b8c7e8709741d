"""Studies: experiments whose results are learning curves over seeds, not speed or memory (those are benchmarks/).

`python -m studies.learning`: PACS vs GRPO vs RLOO over seeds on the demo task (docs/learning-study.md).
"""
