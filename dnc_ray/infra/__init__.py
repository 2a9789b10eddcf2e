"""Infrastructure: Ray start-up, the run store, progress output, storage paths."""
