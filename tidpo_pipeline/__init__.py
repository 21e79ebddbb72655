"""tidpo's Dagster definitions: assets, checks, resources, jobs, the schedule and the sensor (thin: the work is
tidpo_core's). Importing it applies tidpo's offline defaults before transformers, datasets or mlflow load."""

from tidpo_core.runtime.offline import apply_offline_defaults

apply_offline_defaults()
