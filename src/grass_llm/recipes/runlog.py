"""Where ``grass_llm.runlog`` lived before it moved below the applications; kept so that old imports work."""

from grass_llm.runlog import LOG_FILENAME, PHASES, RunLogError, RunLogger, read_log

__all__ = ["LOG_FILENAME", "PHASES", "RunLogError", "RunLogger", "read_log"]
