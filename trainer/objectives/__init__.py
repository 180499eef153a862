"""Training objectives as plug-ins (flow matching, DMD, ...)."""
