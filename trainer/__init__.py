"""Ray Train + DeepSpeed runtime with plug-in objectives (flow matching, DMD), export and eval."""
