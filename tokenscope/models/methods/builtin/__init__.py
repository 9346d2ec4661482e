"""The built-in methods, one file each; every module here that defines METHOD is registered."""
