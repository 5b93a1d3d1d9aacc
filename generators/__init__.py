"""Pure stages that write instruction data (teacher conversations, absent-object negatives)."""
