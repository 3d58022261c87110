"""The live path: sensor readings over MQTT into bronze (exactly once), scored online, alerted.

Modules, by the platform's nouns:
  (settings) the stream's settings are `pipelines.settings.Settings.stream` (PLATFORM_STREAM_*)
  messages   an MQTT message -> a reading (bronze row) or a refusal (quarantine row with the rule)
  ledger     which (device, seq) each bronze partition already holds: redeliveries never duplicate
  commit     micro-batches committed to bronze through the lake's manifest protocol
  scoring    online features (gold's own `to_gold`) and the champion's score per reading
  live       the scoring worker (alerts, device state) and the scorer's own process, warmed from bronze
  state      the latest state per device (Redis, or memory without it)
  notify     Airflow asset events for the bronze partitions a commit touched
  ingester   the MQTT subscriber tying these together (`platform stream`)
  http       the per-device state over HTTP
  publisher  the simulated fleet published in real time (`platform simulate --mqtt`)
"""
