"""hotcold.engine"""
