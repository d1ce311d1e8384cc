"""Input data: readers, dataset builders and the input pipeline."""
