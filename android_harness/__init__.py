"""Deploy the device runtime to a Raspberry Pi / any Linux box (ssh) or an Android phone with Termux (adb).

Workstation side only (``fedmoe-android``, see ``android_harness.cli``): probe a target, build a wheelhouse
for its platform, push it with the runtime, install offline in a venv, enroll with a one-time token (the
device's key is generated on the device), run the runtime as a service.
"""
