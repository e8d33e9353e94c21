"""The bottom floor: what every other package shares and nothing else.

Value types of the pipeline (:mod:`core.record`), the one table of record kinds
and their delivery classes (:mod:`core.kinds`), time (:mod:`core.clock`), topics
(:mod:`core.topics`), MQTT connection settings (:mod:`core.mqtt`), paired-device
values (:mod:`core.devices`) and the error base classes (:mod:`core.errors`).
It imports nothing of the project (an import-linter contract checks it).
"""
