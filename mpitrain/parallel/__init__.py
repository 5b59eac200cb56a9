"""Model parallelism: pipeline stages (pipeline.py, schedules in schedule.py)."""
