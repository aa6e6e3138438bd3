"""Workflows chain stages: gmtext-pipeline (release → generate → select → fine-tune) and the
canary audit (plant canaries → release → generate → measure). They sit above the stages so that
no stage ever imports another one."""
