"""Support: the public contact form and the admins' Support page (issue 4 fills these in)."""
from flask import Blueprint, abort, render_template
from flask_login import current_user, login_required

bp = Blueprint("support", __name__)


@bp.get("/support/contact")
def contact():
    """Contact form for people who lost access to their authenticator app (placeholder)."""
    return render_template("support/contact_placeholder.html")


@bp.get("/support")
@login_required
def index():
    """The admins' Support page (placeholder)."""
    if not current_user.is_admin:
        abort(403)
    return render_template("support/index_placeholder.html")
