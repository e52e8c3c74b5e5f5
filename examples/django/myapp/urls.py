"""No views: the example is driven from manage.py."""

urlpatterns: list[object] = []
