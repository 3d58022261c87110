"""What each DAG task and CLI command does: read from the lake, call pure transforms, gate, publish."""
