"""hotcold.convert"""
