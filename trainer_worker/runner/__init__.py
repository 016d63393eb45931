"""The job runner: a job spec in, ranks under the DeepSpeed launcher, progress events and an artifact out."""
