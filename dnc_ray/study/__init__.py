"""The paper's study as one job: cells keyed by their inputs (cells.py), the study's cells (plan.py),
its config (config.py), the report in the paper's layout (report.py, the paper's figures in paper.py)."""
