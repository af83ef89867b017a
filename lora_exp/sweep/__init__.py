"""The sweep owns Optuna: sweep files (`spec`), the plan every worker gets (`plan`), the study's
storage and claims (`storage`, `claims`), one trial (`trial`) and how its outcome is recorded
(`outcome`), the worker loop (`worker`) and the command (`command`). Training never imports
Optuna; it takes callbacks."""
