"""User Settings: the Two-Factor Authentication row and (issue 3) the enrolment wizard behind the gear."""
from flask import Blueprint, render_template
from flask_login import current_user, login_required

from .models import Device

bp = Blueprint("settings", __name__, url_prefix="/settings")


@bp.get("")
@login_required
def index():
    """The User Settings page."""
    devices = list(Device.select().where(Device.user == current_user.id).order_by(Device.created_at))
    return render_template("settings/index.html", devices=devices)


@bp.get("/2fa")
@login_required
def tfa():
    """Placeholder for the enrolment wizard (replaced by the wizard issue)."""
    return render_template("settings/tfa_placeholder.html")
