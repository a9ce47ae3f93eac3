"""Ray: pretraining as Ray Train workers, evaluation on a pool of actors, prepare as Ray tasks, and a small
job-submission wrapper (`jepa4rec submit`)."""
