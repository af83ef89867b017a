"""The one owner of MLflow: connecting to a store, opening and closing runs (`runs`), the sweep's
parent run and its registered model (`parent`), and what every run is tagged with (`provenance`)."""
