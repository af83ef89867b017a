"""What a user does with recorded runs: train one (`train`), rerun one (`rerun`), find a study's
best (`best`), take an adapter out (`export`), try it (`generate`). A run id leads to the config
recorded with the run (`recorded`), read as data."""
